"""memtrack.phase: the C phase type, plus use as a decorator."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from . import _core

F = TypeVar("F", bound=Callable[..., Any])


class phase(_core.Phase):
    """Measure a block of code: ``with memtrack.phase("parse") as p: ...``.

    After the block, ``p.stats`` is a :class:`PhaseStats` with the exact RSS peak of the
    block (``peak_delta``), the memory it retained (``rss_delta``) and more. Phases nest:
    a phase inside ``"index"`` has the path ``"index/parse"``. Each thread has its own
    stack. Used as ``@memtrack.phase("parse")`` it measures every call of the function.
    """

    __slots__ = ()

    def __call__(self, func: F) -> F:
        if not callable(func):
            raise TypeError(f"phase({self.name!r}) decorates a callable, not {type(func).__name__}")
        name = self.name
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with phase(name):
                    return await func(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return func(*args, **kwargs)

        return run  # type: ignore[return-value]
