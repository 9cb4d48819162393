// Feedback labeling page: answer keys, one submission at a time, and the ranking list
// (drag and drop, or the up/down buttons for keyboards). Without this script the page still
// works with the mouse: every answer is a plain form button.
"use strict";

(function () {
  const form = document.querySelector("form.fb-item");
  if (!form) return;
  // Ranking: the list order is the answer, best first, kept in the hidden "order" field.
  const list = document.getElementById("fb-rank");
  const order = document.getElementById("fb-order");

  function syncOrder() {
    if (list && order) order.value = Array.from(list.children, (li) => li.dataset.id).join(",");
  }

  // One answer per page: a second click or key while the first is on its way is ignored.
  let sent = false;
  form.addEventListener("submit", (event) => {
    if (sent) event.preventDefault();
    sent = true;
    syncOrder();
  });

  // Keys: a button with data-key="x" is pressed by the key x (1-5, a/b, s for skip).
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.target;
    if (target && target.closest && target.closest("input, textarea, select")) return;
    const key = event.key.toLowerCase();
    const button = form.querySelector(`button[data-key="${CSS.escape(key)}"]`);
    if (!button) return;
    event.preventDefault();
    button.click();
  });
  form.dataset.ready = "keys"; // what a test waits for before pressing keys

  if (!list || !order) return;

  list.addEventListener("click", (event) => {
    const button = event.target.closest("button.fb-up, button.fb-down");
    if (!button) return;
    const item = button.closest("li");
    if (button.classList.contains("fb-up") && item.previousElementSibling) {
      list.insertBefore(item, item.previousElementSibling);
    } else if (button.classList.contains("fb-down") && item.nextElementSibling) {
      list.insertBefore(item.nextElementSibling, item);
    }
    button.focus(); // keep the keyboard on the reply being moved
    syncOrder();
  });

  let dragged = null;
  list.addEventListener("dragstart", (event) => {
    dragged = event.target.closest("li");
    if (!dragged) return;
    event.dataTransfer.effectAllowed = "move";
    event.dataTransfer.setData("text/plain", dragged.dataset.id);
    dragged.classList.add("fb-dragging");
  });
  list.addEventListener("dragover", (event) => {
    if (!dragged) return;
    event.preventDefault();
    const over = event.target.closest("li");
    if (!over || over === dragged) return;
    const box = over.getBoundingClientRect();
    const below = event.clientY > box.top + box.height / 2;
    list.insertBefore(dragged, below ? over.nextElementSibling : over);
  });
  list.addEventListener("drop", (event) => {
    event.preventDefault();
    syncOrder();
  });
  list.addEventListener("dragend", () => {
    if (dragged) dragged.classList.remove("fb-dragging");
    dragged = null;
    syncOrder();
  });
})();
