// The charts of a memtrack HTML report, drawn by Chart.js from the embedded JSON data.
// Chart configuration only: every pixel is drawn by the library.
// The live page of `memtrack serve` draws the same charts: it calls
// memtrackReport.build(data) and then .update(data) each time new readings arrive.
(function () {
  "use strict";
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
  function escapeHtml(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;");
  }

  function build(data) {
    function phaseName(i) { return i < 0 ? "(no phase)" : data.phases[i]; }
    function phaseColor(i) { return i < 0 ? GREY : data.palette[i % data.palette.length]; }
    function sizeAxis() {
      return { beginAtZero: true, afterBuildTicks: binarySteps,
               ticks: { callback: function (v) { return size(v); } } };
    }
    function timeAxis() {
      var axis = { type: "linear", max: data.duration > 0 ? data.duration : 1,
                   title: { display: true, text: data.time_title || "seconds since start" } };
      axis.min = data.time_min !== undefined ? data.time_min : 0;
      return axis;
    }

    // Legend (HTML): the pool lines and one swatch per phase.
    function drawLegend() {
      var items = [];
      if (data.pool.pss.length) items.push('<span><span class="line"></span>pool PSS</span>');
      if (data.pool.rss.length) items.push('<span><span class="line dashed"></span>pool RSS sum</span>');
      data.phases.forEach(function (name, i) {
        items.push('<span><span class="swatch" style="background:' + phaseColor(i) + '"></span>' +
                   escapeHtml(name) + "</span>");
      });
      items.push('<span><span class="swatch" style="background:' + GREY + '"></span>(no phase)</span>');
      document.getElementById("timeline-legend").innerHTML = items.join("");
    }

    // 1. Timeline: every process, coloured by phase, and the pool totals.
    function xy(rows) { return rows.map(function (r) { return { x: r[0], y: r[1] }; }); }
    function timelineConfig() {
      var datasets = [];
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
          label: proc.role + " " + proc.pid, data: points,
          borderWidth: proc.role === "worker" ? 1.4 : 2,
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
      return {
        type: "line",
        data: { datasets: datasets },
        options: {
          maintainAspectRatio: false, parsing: false, normalized: true,
          interaction: { mode: "nearest", intersect: false, axis: "xy" },
          scales: { x: timeAxis(), y: sizeAxis() },
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
      };
    }

    // 2. Phase lanes: one row per process, a bar for each stretch of time in a phase.
    function lanesConfig() {
      var byPhase = {};
      data.intervals.forEach(function (iv) {
        (byPhase[iv[3]] = byPhase[iv[3]] || []).push({ y: iv[0], x: [iv[1], iv[2]] });
      });
      var laneSets = Object.keys(byPhase).map(function (key) {
        var i = Number(key);
        return { label: phaseName(i), data: byPhase[key], backgroundColor: phaseColor(i),
                 grouped: false, barPercentage: 0.9, categoryPercentage: 0.9, borderSkipped: false };
      });
      return {
        type: "bar",
        data: { labels: data.lanes, datasets: laneSets },
        options: {
          indexAxis: "y", maintainAspectRatio: false,
          scales: { x: timeAxis(), y: { ticks: { autoSkip: false, font: { size: 11 } } } },
          plugins: {
            legend: { display: false },
            tooltip: { callbacks: { label: function (ctx) {
              var r = ctx.raw.x;
              return ctx.dataset.label + ": " + r[0].toFixed(2) + " - " + r[1].toFixed(2) + " s";
            } } }
          }
        }
      };
    }

    // 3. Per-phase bars: how far each phase rises above its start, and what it keeps.
    function barsConfig() {
      var bars = data.phase_bars;
      // A phase that gives back a few KiB would stretch the axis below zero for nothing;
      // a real drop (over 2% of the largest bar) keeps its negative bar.
      var largest = Math.max.apply(null, [1].concat(bars.map(function (b) { return b.peak_delta; })));
      var lowest = Math.min.apply(null, [0].concat(bars.map(function (b) { return b.retained; })));
      var barAxis = Object.assign(sizeAxis(), lowest > -0.02 * largest ? { min: 0 } : {});
      return {
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
      };
    }

    // A chart without data is hidden (its container too) and made once data arrives.
    function drawOptional(chart, canvasId, hasData, config) {
      var canvas = document.getElementById(canvasId);
      canvas.parentNode.style.display = hasData ? "" : "none";
      if (!hasData) return chart;
      return draw(chart, canvas, config());
    }
    function draw(chart, canvas, config) {
      if (!chart) return new Chart(canvas, config);
      chart.data = config.data;
      chart.options = config.options;
      chart.update("none");
      return chart;
    }

    var charts = { timeline: null, lanes: null, bars: null };
    function render() {
      drawLegend();
      charts.timeline = draw(charts.timeline, document.getElementById("timeline"), timelineConfig());
      var lanesBox = document.getElementById("lanes").parentNode;
      lanesBox.style.height = (50 + 22 * Math.max(1, data.lanes.length)) + "px";
      charts.lanes = drawOptional(charts.lanes, "lanes", data.intervals.length > 0, lanesConfig);
      var note = document.getElementById("lanes-note");
      if (!data.intervals.length) note.textContent = data.no_lanes_note || "No phase information in this profile.";
      else if (data.lanes_hidden) note.textContent = data.lanes_hidden + " more processes not shown.";
      else note.textContent = "";
      charts.bars = drawOptional(charts.bars, "phase-bars", data.phase_bars.length > 0, barsConfig);
    }
    render();
    return {
      charts: charts,
      update: function (newData) { data = newData; render(); }
    };
  }

  window.memtrackReport = { build: build, size: size };
  var embedded = document.getElementById("memtrack-data");
  if (embedded) {
    build(JSON.parse(embedded.textContent));
    document.body.setAttribute("data-charts", "ready");
  }
})();
