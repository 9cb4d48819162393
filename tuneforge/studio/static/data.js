// Upload a data file through the jobs API (/v1/files), then open its check report.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload-form");
  const error = document.getElementById("upload-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("upload-file");
    if (!input.files.length) { Studio.show(error, "Choose a file to upload first."); return; }
    const body = new FormData();
    body.append("purpose", "fine-tune");
    body.append("file", input.files[0]);
    document.getElementById("upload-button").disabled = true;
    const result = await Studio.api("/v1/files", {method: "POST", body: body});
    document.getElementById("upload-button").disabled = false;
    if (!result.ok) { Studio.show(error, Studio.errorMessage(result)); return; }
    window.location.href = "/studio/data/" + encodeURIComponent(result.body.id);
  });
});
