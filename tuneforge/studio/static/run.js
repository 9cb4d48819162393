// A run's live curves: server-sent events from the run's metrics.jsonl, drawn with Plotly.
// Training records (with "loss") feed the loss and tokens/s plots, evaluation records (val_*)
// the validation plot; new points are appended with Plotly.extendTraces, never redrawn.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("run-curves");
  if (!box) return;
  const ident = box.dataset.run;
  const layout = (title, y) => ({title: {text: title}, margin: {l: 50, r: 10, t: 40, b: 40},
                                 xaxis: {title: {text: "step"}}, yaxis: {title: {text: y}},
                                 legend: {orientation: "h"}});
  const config = {displaylogo: false, responsive: true};
  const state = {points: 0, valNames: [], started: false};
  window.studioRun = state;  // read by the browser tests
  const count = document.getElementById("point-count");

  function start() {
    Plotly.newPlot("plot-loss", [{x: [], y: [], name: "train loss", mode: "lines"}],
                   layout("Training loss", "loss"), config);
    Plotly.newPlot("plot-speed", [{x: [], y: [], name: "tokens/s", mode: "lines"}],
                   layout("Throughput", "tokens/s"), config);
    Plotly.newPlot("plot-val", [], layout("Validation", "value"), config);
    state.points = 0; state.valNames = []; state.started = true;
  }

  function add(records) {
    const loss = {x: [], y: []}, speed = {x: [], y: []}, val = {};
    for (const r of records) {
      if (typeof r.loss === "number") { loss.x.push(r.step); loss.y.push(r.loss); }
      if (typeof r.tokens_per_s === "number") { speed.x.push(r.step); speed.y.push(r.tokens_per_s); }
      for (const [k, v] of Object.entries(r)) {
        // perplexity is exp(loss): on the same axis it would flatten every other curve
        if (k.startsWith("val_") && !k.endsWith("_ppl") && typeof v === "number") {
          (val[k] = val[k] || {x: [], y: []}).x.push(r.step);
          val[k].y.push(v);
        }
      }
    }
    if (loss.x.length) Plotly.extendTraces("plot-loss", {x: [loss.x], y: [loss.y]}, [0]);
    if (speed.x.length) Plotly.extendTraces("plot-speed", {x: [speed.x], y: [speed.y]}, [0]);
    for (const [name, pts] of Object.entries(val)) {
      let i = state.valNames.indexOf(name);
      if (i < 0) {
        state.valNames.push(name);
        Plotly.addTraces("plot-val", {x: pts.x, y: pts.y, name: name, mode: "lines+markers"});
      } else {
        Plotly.extendTraces("plot-val", {x: [pts.x], y: [pts.y]}, [i]);
      }
    }
    state.points += loss.x.length;
    count.textContent = String(state.points);
    box.dataset.points = String(state.points);
  }

  const source = new EventSource("/studio/api/runs/" + ident.split("/").map(encodeURIComponent).join("/") + "/stream");
  source.addEventListener("reset", start);
  source.addEventListener("records", (e) => add(JSON.parse(e.data)));
  // status, facts, checkpoints and summary: sent when the status or the checkpoints change
  // (the tables come as HTML the server escaped, as it escapes the whole page)
  source.addEventListener("status", (e) => {
    const info = JSON.parse(e.data), badge = document.getElementById("run-status");
    badge.textContent = info.status;
    badge.dataset.status = info.status;
    badge.className = "badge " + info.status.replace(" ", "-");
    document.getElementById("run-steps").textContent = info.steps;
    document.getElementById("run-best").textContent = info.best;
    document.getElementById("run-duration").textContent = info.duration;
    document.getElementById("checkpoints-box").innerHTML = info.checkpoints_html;
    document.getElementById("summary-box").innerHTML = info.summary_html;
  });
  source.addEventListener("done", () => {
    source.close();
    box.dataset.done = "true";
    document.getElementById("curve-state").textContent = "Finished";
  });
});
