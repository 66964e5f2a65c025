"""Sizes in the API: bytes as int, or text such as "1.2 GB" and "512 MiB"."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(value: int | str, *, what: str = "size") -> int:
    """Bytes from an int or from text with a decimal (kB, MB, GB) or binary (KiB, MiB) unit.

    >>> parse_size("1.2 GB"), parse_size("512 MiB"), parse_size(4096)
    (1200000000, 536870912, 4096)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            f"{what} must be an int or a str such as '512 MiB', not {type(value).__name__}"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must not be negative: {value}")
        return value
    match = _SIZE.fullmatch(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{what}: cannot read {value!r} as a size; use bytes or a unit such as "
            "'300 MB', '1.2 GB', '512 MiB'"
        )
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number):
        raise ValueError(f"{what}: {value!r} is too large")
    return int(round(number))


def format_size(n: float | int | None, *, signed: bool = False) -> str:
    """Human-readable bytes with binary units ("1.2 GiB"); None reads as "-"."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ("+" if signed and n > 0 else "")
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
