// The live page of `memtrack serve`: rounds of readings arrive as Server-Sent Events and
// become the report's chart data, drawn by the report's own charts (report.js).
// While the tab is hidden the feed is closed (Page Visibility API); on return the page
// reconnects and gets the whole window again.
(function () {
  "use strict";
  var MAX_LANES = 64;
  var body = document.body;
  var query = body.getAttribute("data-query") || "";
  var size = memtrackReport.size;
  var view = null, feed = null, data = null, info = null, updates = 0;
  var byPid = {};

  function escapeHtml(v) {
    return String(v === null || v === undefined ? "-" : v)
      .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function setStatus(text) { document.getElementById("status").textContent = text; }

  function reset(snapshotInfo) {
    info = snapshotInfo;
    byPid = {};
    data = {
      duration: 1, time_min: 0, phases: [], palette: info.palette, processes: [],
      pool: { source: info.kind, rss: [], pss: [] }, peak: null, lanes: [], lanes_hidden: 0,
      intervals: [], phase_bars: [], time_title: "seconds since the server started",
      no_lanes_note: "No worker is in a phase yet."
    };
  }

  function addRound(r) {
    r.w.forEach(function (w) {
      var proc = byPid[w[0]];
      if (!proc) {
        proc = byPid[w[0]] = { pid: w[0], role: "worker", points: [] };
        data.processes.push(proc);
      }
      proc.points.push([r.t, w[1], w[2]]);
    });
    data.pool.rss.push([r.t, r.pool[0]]);
    if (r.pool[1] !== null) data.pool.pss.push([r.t, r.pool[1]]);
    data.duration = Math.max(r.t, 1);
  }

  // Keep the window: drop points older than it, and workers with no point left.
  function trim() {
    var oldest = data.duration - info.window;
    if (oldest <= 0) return;
    function keep(rows) { while (rows.length && rows[0][0] < oldest) rows.shift(); }
    keep(data.pool.rss); keep(data.pool.pss);
    data.processes = data.processes.filter(function (p) {
      keep(p.points);
      if (!p.points.length) delete byPid[p.pid];
      return p.points.length > 0;
    });
    data.time_min = oldest;
  }

  // The lanes chart wants intervals: each run of points in one phase is one bar.
  function derive() {
    data.processes.sort(function (a, b) { return a.pid - b.pid; });
    var inPhase = data.processes.filter(function (p) {
      return p.points.some(function (r) { return r[2] >= 0; });
    });
    var shown = inPhase.slice(0, MAX_LANES);
    data.lanes = shown.map(function (p) { return "worker " + p.pid; });
    data.lanes_hidden = inPhase.length - shown.length;
    data.intervals = [];
    shown.forEach(function (p, lane) {
      var start = null, phase = -1, pts = p.points;
      for (var i = 0; i <= pts.length; i++) {
        var cur = i < pts.length ? pts[i][2] : -2;
        if (cur !== phase) {
          if (phase >= 0) data.intervals.push([data.lanes[lane], start, pts[i < pts.length ? i : i - 1][0], phase]);
          phase = cur;
          start = i < pts.length ? pts[i][0] : null;
        }
      }
    });
    var best = null;
    var series = data.pool.pss.length ? data.pool.pss : data.pool.rss;
    series.forEach(function (r) { if (!best || r[1] > best.bytes) best = { time: r[0], bytes: r[1] }; });
    data.peak = best;
  }

  function showStatus(status) {
    data.phases = status.phases;
    data.phase_bars = status.bars;
    var t = status.totals;
    var cards = [
      ["Live workers", String(t.live), t.dead + " exited or killed"],
      ["Pool memory", size(t.memory), "PSS of each live worker (RSS until read)"],
      ["Pool RSS sum", size(t.rss), "shared pages counted once per worker"],
      ["Largest worker peak", size(t.peak_rss), "dead workers included"]
    ];
    document.getElementById("cards").innerHTML = cards.map(function (c) {
      return '<div class="card"><div class="label">' + escapeHtml(c[0]) + '</div><div class="value">' +
        escapeHtml(c[1]) + '</div><div class="note">' + escapeHtml(c[2]) + "</div></div>";
    }).join("");
    var gone = document.getElementById("gone");
    gone.hidden = !status.gone;
    gone.textContent = status.gone ? status.gone + ": this is its final state." : "";
    var numeric = [false, false, false, true, true, true, true, true, false];
    var head = ["worker", "pid", "state", "RSS", "peak RSS", "USS", "PSS", "tasks", "phase"];
    var rows = status.workers.map(function (w) {
      var state = w.state;
      if (w.exit_signal) state += " (signal " + w.exit_signal + ")";
      else if (w.exit_code !== null && w.exit_code !== undefined) state += " (code " + w.exit_code + ")";
      if (w.error) state += ": " + w.error;
      var cells = [w.label, w.pid, state, size(w.rss), size(w.peak_rss), w.uss ? size(w.uss) : "-",
                   w.pss ? size(w.pss) : "-", w.tasks, w.phase || "-"];
      var bad = w.state === "killed" || w.state === "corrupt" || w.exit_signal;
      return "<tr" + (bad ? ' class="bad"' : "") + ">" + cells.map(function (c, i) {
        return '<td class="' + (numeric[i] ? "num" : "") + '">' + escapeHtml(c) + "</td>";
      }).join("") + "</tr>";
    });
    document.getElementById("workers").innerHTML = rows.length
      ? "<table><thead><tr>" + head.map(function (h, i) {
          return '<th class="' + (numeric[i] ? "num" : "") + '">' + h + "</th>";
        }).join("") + "</tr></thead><tbody>" + rows.join("") + "</tbody></table>"
      : "<p>No worker has joined yet.</p>";
  }

  function draw(status) {
    trim();
    derive();
    showStatus(status);
    if (view) view.update(data); else view = memtrackReport.build(data);
    updates += 1;
    body.setAttribute("data-updates", String(updates));
    body.setAttribute("data-charts", "ready");
    setStatus(status.gone ? "source gone" : "live, every " + info.interval + " s");
  }

  function connect() {
    if (feed) return;
    feed = new EventSource("/events" + query);
    feed.addEventListener("snapshot", function (e) {
      var msg = JSON.parse(e.data);
      reset(msg.info);
      msg.rounds.forEach(addRound);
      draw(msg.status);
    });
    feed.addEventListener("tick", function (e) {
      if (!data) return;
      var msg = JSON.parse(e.data);
      addRound(msg.round);
      draw(msg.status);
    });
    feed.onerror = function () { setStatus("disconnected: retrying"); };
  }
  function disconnect() {
    if (feed) { feed.close(); feed = null; }
    setStatus("paused while the tab is hidden");
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) disconnect(); else connect();
  });
  if (!document.hidden) connect(); else disconnect();
})();
