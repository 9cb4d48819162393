// Shared by the studio's page scripts: API calls with the signed-in key, small DOM helpers.
"use strict";
window.Studio = (() => {
  const KEY = "tuneforge_key";  // set by login.js in this tab's sessionStorage

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = sessionStorage.getItem(KEY);
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // fetch an API path; resolves to {ok, status, body} (body parsed as JSON when it is JSON)
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    let response;
    try {
      response = await fetch(path, opts);
    } catch (err) {
      return {ok: false, status: 0, body: {error: {message: "network error: " + err}}};
    }
    const text = await response.text();
    let body = text;
    try { body = JSON.parse(text); } catch (_) { /* not JSON */ }
    return {ok: response.ok, status: response.status, body: body};
  }

  function errorMessage(result) {
    const err = result.body && result.body.error;
    if (err && err.message) return err.message;
    if (result.status === 401) return "Not signed in: open /studio/login and give your API key";
    return "request failed (HTTP " + result.status + ")";
  }

  function show(el, text) {
    el.textContent = text;
    el.hidden = !text;
  }

  function data(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  return {api, headers, errorMessage, show, data};
})();
