// Small improvements on top of pages that work without JavaScript:
// copy buttons for commands, and search results while typing.
"use strict";

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function addCopyButtons() {
  if (!navigator.clipboard) return;
  for (const pre of document.querySelectorAll("pre[data-copy]")) {
    if (pre.querySelector("button.copy")) continue;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy small";
    button.textContent = "Copy";
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(pre.querySelector("code").textContent);
        button.textContent = "Copied";
      } catch (e) {
        button.textContent = "Select";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    pre.appendChild(button);
  }
}

function renderResults(doc) {
  if (doc.loading) return '<p class="muted">The package list is still being read…</p>';
  if (!doc.query.trim()) return "";
  if (!doc.results.length) return `<p>No package matches <strong>${escapeHtml(doc.query)}</strong>.</p>`;
  const rows = doc.results.map((e) => {
    const buildable = e.kind === "package" || e.kind === null;
    const kind = buildable ? "" : ` <span class="badge">${escapeHtml(e.kind)}</span>`;
    const version = e.version ? escapeHtml(e.version) : '<span class="muted">–</span>';
    const action = buildable
      ? `<form method="post" action="/builds" class="inline"><input type="hidden" name="image" value="shell/${escapeHtml(e.name)}"><button type="submit" class="small" aria-label="Build shell/${escapeHtml(e.name)}">Build</button></form>`
      : "";
    const desc = e.description ? escapeHtml(e.description) : "";
    return `<tr><td><code>${escapeHtml(e.name)}</code>${kind}<div class="desc">${desc}</div></td><td>${version}</td><td>${action}</td></tr>`;
  });
  return `<div class="table-wrap"><table class="results"><thead><tr><th>Name</th><th>Version</th><th><span class="visually-hidden">Build</span></th></tr></thead><tbody>${rows.join("")}</tbody></table></div>`;
}

function liveSearch() {
  const input = document.getElementById("search-q");
  const target = document.getElementById("live-results");
  if (!input || !target) return;
  let timer = null;
  let latest = 0;
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const query = input.value;
      const serial = ++latest;
      try {
        const response = await fetch(`/packages?format=json&q=${encodeURIComponent(query)}`, { headers: { Accept: "application/json" } });
        const doc = await response.json();
        if (serial === latest) target.innerHTML = renderResults(doc);
      } catch (e) {
        /* the form still works */
      }
    }, 150);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  addCopyButtons();
  liveSearch();
});
