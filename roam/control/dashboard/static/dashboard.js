// roam dashboard: swaps the sections the server sends on /ui/stream, ticks the clocks
// of [data-since] elements, and confirms every action before it is posted. The server
// renders all HTML; this script renders none.
"use strict";

const pending = new Map(); // section id -> HTML held back while the user works in it
const confirmDialog = document.getElementById("confirm");

function busy(element) {
  // hold a section back while the user picks in one of its fields or confirms
  const active = document.activeElement;
  return confirmDialog.open ||
    (element.contains(active) && ["SELECT", "INPUT"].includes(active.tagName));
}

function swap(id, html) {
  const element = document.getElementById(id);
  if (!element) return;
  if (busy(element)) { pending.set(id, html); return; }
  pending.delete(id);
  element.innerHTML = html;
  tick();
}

function flush() {
  for (const [id, html] of [...pending]) swap(id, html);
}

function elapsed(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const m = Math.floor(seconds / 60), s = seconds % 60;
  return m ? `${m} min ${String(s).padStart(2, "0")} s` : `${s} s`;
}

function tick() {
  const now = Date.now() / 1000;
  for (const element of document.querySelectorAll("[data-since]")) {
    element.textContent = elapsed(now - Number(element.dataset.since));
  }
}

function toast(text, error) {
  const element = document.createElement("div");
  element.className = error ? "toast error" : "toast";
  element.textContent = text;
  document.getElementById("toasts").append(element);
  setTimeout(() => element.remove(), error ? 8000 : 4000);
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/ui/stream");
  for (const id of ["summary", "nodes", "vms", "migrations", "plots"]) {
    source.addEventListener(id, (event) => swap(id, event.data));
  }
  source.onopen = () => { live.dataset.state = "live"; live.textContent = "live"; };
  source.onerror = async () => {
    live.dataset.state = "offline"; live.textContent = "reconnecting";
    if (source.readyState === EventSource.CLOSED) {
      // refused (the session ended?): back to the login page, else try again
      const answer = await fetch("/", { redirect: "manual" }).catch(() => null);
      if (answer && answer.type === "opaqueredirect") { location.assign("/login"); return; }
      setTimeout(connect, 2000);
    }
  };
}

function ask(text) {
  document.getElementById("confirm-text").textContent = text;
  confirmDialog.returnValue = "";
  confirmDialog.showModal();
  document.getElementById("confirm-ok").focus();
  return new Promise((resolve) => {
    confirmDialog.addEventListener("close", () => resolve(confirmDialog.returnValue === "ok"),
                                   { once: true });
  });
}

document.addEventListener("submit", async (event) => {
  const form = event.target;
  if (!form.dataset.confirm) return;
  event.preventDefault();
  const select = form.querySelector("select");
  const where = select && select.value ? select.value : "wherever the scheduler places it";
  const confirmed = await ask(form.dataset.confirm.replace("{to}", where));
  document.activeElement.blur();
  flush();
  if (!confirmed) return;
  const answer = await fetch(form.action, {
    method: "POST", headers: { Accept: "application/json" },
    body: new URLSearchParams(new FormData(form)),
  }).catch((error) => ({ ok: false, json: async () => ({ detail: String(error) }) }));
  const body = await answer.json().catch(() => ({}));
  toast(body.detail || (answer.ok ? "requested" : "refused"), !answer.ok);
});

document.addEventListener("focusout", () => setTimeout(flush, 0));
setInterval(tick, 1000);
tick();
connect();
