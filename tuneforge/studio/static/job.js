// Watch a fine-tuning job through the jobs API: status and events each second; cancel.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("job");
  const id = box.dataset.job;
  const base = "/v1/fine_tuning/jobs/" + encodeURIComponent(id);
  const ACTIVE = ["validating_files", "queued", "running", "paused"];
  const error = document.getElementById("job-error");
  const cancel = document.getElementById("job-cancel");
  let timer = null;

  function render(job) {
    const status = document.getElementById("job-status");
    status.textContent = job.status;
    status.dataset.status = job.status;
    status.className = "badge " + job.status;
    document.getElementById("job-model").textContent = job.model;
    document.getElementById("job-tokens").textContent = job.trained_tokens ?? "–";
    const ft = job.fine_tuned_model;
    document.getElementById("job-ft-model").textContent = ft || "–";
    const tryIt = document.getElementById("job-try");
    if (ft) { tryIt.href = "/studio/playground?model=" + encodeURIComponent(ft); tryIt.hidden = false; }
    cancel.hidden = !ACTIVE.includes(job.status);
    if (job.error && job.error.message) Studio.show(error, job.error.message);
  }

  function renderEvents(events) {
    const list = document.getElementById("job-events");
    list.replaceChildren(...events.slice().reverse().map((e) => {
      const li = document.createElement("li");
      li.textContent = new Date(e.created_at * 1000).toLocaleTimeString() + "  " + e.message;
      if (e.level === "error") li.className = "error";
      return li;
    }));
  }

  async function poll() {
    const job = await Studio.api(base);
    if (!job.ok) { Studio.show(error, Studio.errorMessage(job)); return; }
    render(job.body);
    const events = await Studio.api(base + "/events?limit=100");
    if (events.ok) renderEvents(events.body.data);
    if (ACTIVE.includes(job.body.status)) timer = setTimeout(poll, 1000);
    else box.dataset.finished = "true";
  }

  cancel.addEventListener("click", async () => {
    const result = await Studio.api(base + "/cancel", {method: "POST"});
    if (!result.ok) Studio.show(error, Studio.errorMessage(result));
    clearTimeout(timer);
    poll();
  });
  poll();
});
