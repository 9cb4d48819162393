// One prompt to the base model and up to three more, each reply streamed into its pane
// from /v1/chat/completions (stream: true), all at once.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("play-form");
  const error = document.getElementById("play-error");

  async function stream(i, model, messages, maxTokens, temperature) {
    const out = document.getElementById("pane-" + i + "-text");
    out.textContent = "";
    out.dataset.state = "streaming";
    let response;
    try {
      response = await fetch("/v1/chat/completions", {
        method: "POST", headers: Studio.headers({"Content-Type": "application/json"}),
        body: JSON.stringify({model: model, messages: messages, stream: true,
                              max_tokens: maxTokens, temperature: temperature})});
    } catch (err) {
      out.textContent = "network error: " + err; out.dataset.state = "error"; return;
    }
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { message = (await response.json()).error.message; } catch (_) { /* keep */ }
      out.textContent = message; out.dataset.state = "error"; return;
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") continue;
          const chunk = JSON.parse(payload);
          if (chunk.error) { out.textContent += "\n[" + chunk.error.message + "]"; out.dataset.state = "error"; return; }
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) out.textContent += choice.delta.content;
          }
        }
      }
      out.dataset.chars = String(out.textContent.length);
    }
    out.dataset.state = "done";
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    Studio.show(error, "");
    const prompt = document.getElementById("prompt").value;
    if (!prompt.trim()) { Studio.show(error, "prompt: write something to send"); return; }
    const maxTokens = Number(document.getElementById("max-tokens").value);
    const temperature = Number(document.getElementById("temperature").value);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) { Studio.show(error, "max tokens: a whole number, 1 or more"); return; }
    if (!(temperature >= 0 && temperature <= 2)) { Studio.show(error, "temperature: a number from 0 to 2"); return; }
    const messages = [{role: "user", content: prompt}];
    const runs = [];
    for (let i = 0; i < 4; i++) {
      const model = document.getElementById("pane-" + i + "-model").value;
      const out = document.getElementById("pane-" + i + "-text");
      if (model) runs.push(stream(i, model, messages, maxTokens, temperature));
      else { out.textContent = ""; out.dataset.state = "idle"; }
    }
    document.getElementById("play-run").disabled = true;
    await Promise.all(runs);
    document.getElementById("play-run").disabled = false;
  });
});
