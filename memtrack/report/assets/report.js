// The charts of a memtrack HTML report, drawn by Chart.js from the embedded JSON data.
// Chart configuration only: every pixel is drawn by the library.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("memtrack-data").textContent);
  var GREY = "#9aa0a6";
  Chart.defaults.animation = false;
  Chart.defaults.font.family = 'system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';
  Chart.defaults.color = "#444";

  function size(n) {
    if (n === null || n === undefined) return "-";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var sign = n < 0 ? "-" : "";
    n = Math.abs(n);
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return sign + (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }
  function phaseName(i) { return i < 0 ? "(no phase)" : data.phases[i]; }
  function phaseColor(i) { return i < 0 ? GREY : data.palette[i % data.palette.length]; }
  // Byte axes get binary steps (256 MiB, 512 MiB, 1 GiB...), so tick labels read as
  // round numbers in the units the tables use.
  function binarySteps(axis) {
    var span = axis.max - axis.min;
    if (!(span > 0)) return;
    var target = span / 6, step = 1;
    while (step * 2 <= target * Math.SQRT2) step *= 2;
    var ticks = [];
    for (var v = Math.ceil(axis.min / step) * step; v <= axis.max + step * 1e-9; v += step) {
      ticks.push({ value: v });
    }
    axis.ticks = ticks;
  }
  var sizeAxis = { beginAtZero: true, afterBuildTicks: binarySteps,
                   ticks: { callback: function (v) { return size(v); } } };
  var timeAxis = {
    type: "linear", min: 0, max: data.duration > 0 ? data.duration : 1,
    title: { display: true, text: "seconds since start" }
  };

  // Legend (HTML): the pool lines and one swatch per phase.
  var legend = document.getElementById("timeline-legend");
  var items = [];
  if (data.pool.pss.length) items.push('<span><span class="line"></span>pool PSS</span>');
  if (data.pool.rss.length) items.push('<span><span class="line dashed"></span>pool RSS sum</span>');
  data.phases.forEach(function (name, i) {
    items.push('<span><span class="swatch" style="background:' + phaseColor(i) + '"></span>' +
               name.replace(/&/g, "&amp;").replace(/</g, "&lt;") + "</span>");
  });
  items.push('<span><span class="swatch" style="background:' + GREY + '"></span>(no phase)</span>');
  legend.innerHTML = items.join("");

  // 1. Timeline: every process, coloured by phase, and the pool totals.
  var datasets = [];
  function xy(rows) { return rows.map(function (r) { return { x: r[0], y: r[1] }; }); }
  if (data.pool.pss.length) {
    datasets.push({ label: "pool PSS", data: xy(data.pool.pss), borderColor: "#111",
                    borderWidth: 2.5, pointRadius: 0, order: 0 });
  }
  if (data.pool.rss.length) {
    datasets.push({ label: "pool RSS sum", data: xy(data.pool.rss), borderColor: "#555",
                    borderDash: [6, 4], borderWidth: 1.5, pointRadius: 0, order: 1 });
  }
  data.processes.forEach(function (proc) {
    var points = proc.points.map(function (r) { return { x: r[0], y: r[1], phase: r[2] }; });
    datasets.push({
      label: proc.role + " " + proc.pid, data: points, borderWidth: proc.role === "worker" ? 1.4 : 2,
      borderDash: proc.role === "worker" ? [] : [2, 2], pointRadius: 0, order: 2,
      borderColor: GREY,
      segment: { borderColor: function (ctx) { return phaseColor(points[ctx.p0DataIndex].phase); } }
    });
  });
  if (data.peak) {
    datasets.push({ label: "pool peak", data: [{ x: data.peak.time, y: data.peak.bytes }],
                    showLine: false, pointRadius: 6, pointStyle: "triangle",
                    pointBackgroundColor: "#cf222e", borderColor: "#cf222e", order: -1 });
  }
  new Chart(document.getElementById("timeline"), {
    type: "line",
    data: { datasets: datasets },
    options: {
      maintainAspectRatio: false, parsing: false, normalized: true,
      interaction: { mode: "nearest", intersect: false, axis: "xy" },
      scales: { x: timeAxis, y: sizeAxis },
      plugins: {
        legend: { display: false },
        tooltip: { callbacks: {
          label: function (ctx) {
            var text = ctx.dataset.label + ": " + size(ctx.parsed.y);
            var raw = ctx.raw || {};
            if (raw.phase !== undefined) text += " (" + phaseName(raw.phase) + ")";
            return text;
          },
          title: function (items) { return items.length ? items[0].parsed.x.toFixed(2) + " s" : ""; }
        } }
      }
    }
  });

  // 2. Phase lanes: one row per process, a bar for each stretch of time in a phase.
  var byPhase = {};
  data.intervals.forEach(function (iv) {
    (byPhase[iv[3]] = byPhase[iv[3]] || []).push({ y: iv[0], x: [iv[1], iv[2]] });
  });
  var laneSets = Object.keys(byPhase).map(function (key) {
    var i = Number(key);
    return { label: phaseName(i), data: byPhase[key], backgroundColor: phaseColor(i),
             grouped: false, barPercentage: 0.9, categoryPercentage: 0.9, borderSkipped: false };
  });
  var lanesCanvas = document.getElementById("lanes");
  if (!data.intervals.length) lanesCanvas.parentNode.style.display = "none";
  else new Chart(lanesCanvas, {
    type: "bar",
    data: { labels: data.lanes, datasets: laneSets },
    options: {
      indexAxis: "y", maintainAspectRatio: false,
      scales: { x: timeAxis, y: { ticks: { autoSkip: false, font: { size: 11 } } } },
      plugins: {
        legend: { display: false },
        tooltip: { callbacks: { label: function (ctx) {
          var r = ctx.raw.x;
          return ctx.dataset.label + ": " + r[0].toFixed(2) + " - " + r[1].toFixed(2) + " s";
        } } }
      }
    }
  });
  var note = document.getElementById("lanes-note");
  if (!data.intervals.length) note.textContent = "No phase information in this profile.";
  else if (data.lanes_hidden) note.textContent = data.lanes_hidden + " more processes not shown.";

  // 3. Per-phase bars: how far each phase rises above its start, and what it keeps.
  var bars = data.phase_bars;
  // A phase that gives back a few KiB would stretch the axis below zero for nothing;
  // a real drop (over 2% of the largest bar) keeps its negative bar.
  var largest = Math.max.apply(null, [1].concat(bars.map(function (b) { return b.peak_delta; })));
  var lowest = Math.min.apply(null, [0].concat(bars.map(function (b) { return b.retained; })));
  var barAxis = Object.assign({}, sizeAxis, lowest > -0.02 * largest ? { min: 0 } : {});
  var barsCanvas = document.getElementById("phase-bars");
  if (!bars.length) barsCanvas.parentNode.style.display = "none";
  else new Chart(barsCanvas, {
    type: "bar",
    data: {
      labels: bars.map(function (b) { return b.path; }),
      datasets: [
        { label: "max peak above start", data: bars.map(function (b) { return b.peak_delta; }),
          backgroundColor: "#e15759" },
        { label: "mean retained", data: bars.map(function (b) { return b.retained; }),
          backgroundColor: "#4e79a7" }
      ]
    },
    options: {
      indexAxis: "y", maintainAspectRatio: false,
      scales: { x: barAxis },
      plugins: { tooltip: { callbacks: { label: function (ctx) {
        return ctx.dataset.label + ": " + size(ctx.parsed.x) +
               " (peak RSS " + size(bars[ctx.dataIndex].peak_rss) + ")";
      } } } }
    }
  });
  document.body.setAttribute("data-charts", "ready");
})();
