// The new-job form: builds POST /v1/fine_tuning/jobs; a 400 marks the field its param names.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("job-form");
  if (!form) return;
  const general = document.getElementById("job-error");
  const value = (name) => document.getElementById("f-" + name).value.trim();
  // a number where the text is one; otherwise the text itself, for the API to refuse by name
  const number = (text) => (text !== "" && !isNaN(Number(text)) ? Number(text) : text);

  function clear() {
    form.querySelectorAll(".field").forEach((f) => f.classList.remove("invalid"));
    form.querySelectorAll(".field-error").forEach((e) => Studio.show(e, ""));
    Studio.show(general, "");
  }

  function fieldOf(param, message) {
    if (!param) return null;
    const last = param.split(".").pop();
    if (document.getElementById("f-" + last)) return last;
    if (param === "adapter") {  // the message names the key: "adapter.r: ..."
      const m = /adapter\.(\w+)/.exec(message || "");
      if (m && document.getElementById("f-" + m[1])) return m[1];
      return "adapter";
    }
    return null;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear();
    const method = value("method");
    const hyper = {};
    for (const name of ["n_epochs", "batch_size", "learning_rate_multiplier", "beta"]) {
      if (name === "beta" && method !== "dpo") continue;
      const v = value(name);
      if (v !== "" && v !== "auto") hyper[name] = number(v);
    }
    const adapter = {method: value("adapter")};
    for (const name of ["r", "alpha"]) {
      if (value(name) !== "" && adapter.method === "lora") adapter[name] = number(value(name));
    }
    const body = {model: value("model"), training_file: value("training_file"),
                  method: {type: method, [method]: {hyperparameters: hyper}}, adapter: adapter};
    if (value("validation_file")) body.validation_file = value("validation_file");
    if (value("suffix")) body.suffix = value("suffix");
    if (value("seed")) body.seed = number(value("seed"));
    const button = document.getElementById("job-submit");
    button.disabled = true;
    const result = await Studio.api("/v1/fine_tuning/jobs", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    button.disabled = false;
    if (result.ok) {
      window.location.href = "/studio/jobs/" + encodeURIComponent(result.body.id);
      return;
    }
    const err = (result.body && result.body.error) || {};
    const name = fieldOf(err.param, err.message);
    if (name) {
      document.querySelector('.field[data-field="' + name + '"]').classList.add("invalid");
      Studio.show(document.getElementById("err-" + name), Studio.errorMessage(result));
    }
    Studio.show(general, (name ? name + ": " : "") + Studio.errorMessage(result));
  });
});
