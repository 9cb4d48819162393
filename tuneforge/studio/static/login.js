// Keep the key in this tab too: the page scripts send it to the API as a bearer key.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("login-form");
  if (!form) return;
  form.addEventListener("submit", () => {
    sessionStorage.setItem("tuneforge_key", document.getElementById("key").value);
  });
});
