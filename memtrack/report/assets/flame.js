// The allocation flame graph of the HTML report, drawn by d3-flame-graph (vendored beside this
// file with its license). The data is the JSON in #memtrack-flame: {allocated, retained}, each a
// tree {name, value, children} whose root's children are the phases.
(function () {
  "use strict";
  var el = document.getElementById("memtrack-flame");
  var box = document.getElementById("flame");
  if (!el || !box || typeof flamegraph !== "function" || typeof d3 === "undefined") {
    return;
  }
  var data = JSON.parse(el.textContent);
  var details = document.getElementById("flame-details");
  function size(bytes) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
    return (i ? bytes.toFixed(1) : String(Math.round(bytes))) + " " + units[i];
  }
  function draw(measure) {
    box.innerHTML = "";
    var chart = flamegraph()
      .width(Math.max(box.clientWidth, 600))
      .cellHeight(18)
      .minFrameSize(2)
      .transitionDuration(250)
      .inverted(false)
      .sort(true)
      .setDetailsElement(details)
      .setLabelHandler(function (d) {
        var root = data[measure].value || 1;
        return d.data.name + ": " + size(d.value) + " (" + (100 * d.value / root).toFixed(1) + "%)";
      });
    d3.select(box).datum(data[measure]).call(chart);
  }
  var inputs = document.querySelectorAll('input[name="flame-measure"]');
  for (var i = 0; i < inputs.length; i++) {
    inputs[i].addEventListener("change", function (e) { draw(e.target.value); });
  }
  draw("allocated");
})();
