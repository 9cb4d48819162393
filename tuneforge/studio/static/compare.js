// Overlaid curves of the compared runs: training loss and every validation metric.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const runs = Studio.data("compare-data");
  if (!runs) return;
  const layout = (title) => ({title: {text: title}, margin: {l: 50, r: 10, t: 40, b: 40},
                              xaxis: {title: {text: "step"}}, legend: {orientation: "h"}});
  const loss = [], val = [];
  for (const run of runs) {
    const train = run.records.filter((r) => typeof r.loss === "number");
    loss.push({x: train.map((r) => r.step), y: train.map((r) => r.loss), name: run.id,
               mode: "lines"});
    const names = new Set();
    run.records.forEach((r) => Object.keys(r).forEach((k) => {
      if (k.startsWith("val_") && !k.endsWith("_ppl") && typeof r[k] === "number") names.add(k);
    }));
    for (const name of names) {
      const pts = run.records.filter((r) => typeof r[name] === "number");
      val.push({x: pts.map((r) => r.step), y: pts.map((r) => r[name]),
                name: run.id + " " + name, mode: "lines+markers"});
    }
  }
  Plotly.newPlot("compare-loss", loss, layout("Training loss"), {displaylogo: false});
  Plotly.newPlot("compare-val", val, layout("Validation"), {displaylogo: false});
  document.getElementById("compare-curves").dataset.traces = String(loss.length + val.length);
});
