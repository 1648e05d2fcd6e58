// Follows a build's server-sent events and updates the server-rendered page.
// Without JavaScript the page refreshes itself instead (see <noscript>).
"use strict";

(function () {
  const root = document.getElementById("build");
  if (!root) return;
  const ORDER = ["queued", "evaluating", "building", "layering", "compressing", "uploading", "done"];
  const FINAL = ["done", "failed"];
  const NIX_COUNTS = ["built", "to_build", "fetched", "to_fetch"];
  const SHOWN = 200;
  const started = parseFloat(root.dataset.started);
  const state = { reached: new Set(), current: root.dataset.stage, messages: {}, data: {}, compressStarted: null, lastTime: started, platformCounts: {} };

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  // Sizes and rates as nixery/amounts.py says them (size_text, rate_text).
  function size(n) {
    if (n === undefined || n === null) return "–";
    for (const [unit, scale] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) if (n >= scale) return `${(n / scale).toFixed(1)} ${unit}`;
    return `${Math.trunc(n)} B`;
  }
  const MEASURABLE_SECONDS = 0.1;
  function rate(n, seconds) {
    return n > 0 && seconds >= MEASURABLE_SECONDS ? `${size(n / seconds)}/s` : null;
  }

  // One platform's event of an image of several platforms (relayed, tagged with its platform):
  // its row in the platform list, not the image's own stages.
  const LABELS = { queued: "Queued", evaluating: "Evaluating", building: "Building with Nix", layering: "Grouping into layers",
    compressing: "Compressing layers", uploading: "Uploading", done: "Done", failed: "Failed" };
  function platformDetail(event) {
    if (event.platform_stage === "compressing" && event.layers_total !== undefined) return `${event.layers_done || 0}/${event.layers_total} layers`;
    if (event.platform_stage === "done" && event.digest) return `${size(event.size)} in ${event.layers} layers`;
    return event.message || "";
  }
  function addPlatform(event) {
    // Nix's counts of each platform: the image's own "Building with Nix" adds them up.
    const counts = state.platformCounts[event.platform] ||= {};
    for (const key of NIX_COUNTS) if (typeof event[key] === "number") counts[key] = event[key];
    const row = document.querySelector(`#platforms li[data-platform="${CSS.escape(event.platform)}"]`);
    if (!row) return;
    const stage = event.platform_stage;
    row.dataset.stage = stage;
    row.className = { done: "past", failed: "failed" }[stage] || "current";  // builds.py's _PLATFORM_STATES
    const badge = row.querySelector(".badge");
    badge.className = `badge stage-${stage}`;
    badge.textContent = LABELS[stage] || stage;
    row.querySelector(".detail").textContent = platformDetail(event);
    if (event.platform_build && !row.querySelector("a")) {
      row.insertAdjacentHTML("beforeend", ` <a class="hint" href="/builds/${esc(event.platform_build)}">its build</a>`);
    }
  }

  // The page may have been drawn before the image's build named its platforms.
  function listPlatforms(names) {
    if (document.getElementById("platforms") || !names.every((name) => typeof name === "string")) return;
    const items = names.map((name) => `<li class="pending" data-platform="${esc(name)}" data-stage="queued"><span class="label"><code>${esc(name)}</code></span> <span class="badge stage-queued">Queued</span> <span class="detail"></span></li>`);
    document.getElementById("stages").insertAdjacentHTML("afterend", `<h2>Platforms</h2><ol class="stages platforms" id="platforms">${items.join("")}</ol>`);
  }

  function add(event) {
    if (event.platform) return addPlatform(event);
    if (Array.isArray(event.platforms)) listPlatforms(event.platforms);
    state.reached.add(event.stage);
    state.current = event.stage;
    state.messages[event.stage] = event.message;
    for (const [k, v] of Object.entries(event)) if (!["stage", "message", "time", "index"].includes(k)) state.data[k] = v;
    state.lastTime = event.time;
    if (event.stage === "compressing" && state.compressStarted === null) state.compressStarted = event.time;
  }

  const plural = (count, noun) => `${count} ${noun}${count === 1 ? "" : "s"}`;

  // What Nix did: nixery/views.py's nix_work_text, which the server-drawn page and `nixery build` say.
  function nixWork(d, over, ended) {
    const built = d.built || 0, fetched = d.fetched || 0;
    const toBuild = Math.max(built, d.to_build || 0), toFetch = Math.max(fetched, d.to_fetch || 0);
    if (over) return `${plural(toBuild, "derivation")} built` + (toFetch ? `, ${plural(toFetch, "path")} fetched` : "");
    return `${ended ? "ended " : ""}building ${built} of ${plural(toBuild, "derivation")}` + (toFetch ? `, fetching ${fetched} of ${plural(toFetch, "path")}` : "");
  }

  // What the stage did; `ended`: the stage the build failed or was stopped in (builds.py's Progress.detail).
  function detail(stage, ended) {
    const d = state.data;
    if (stage === "building") {
      const platforms = Object.values(state.platformCounts);
      const d = platforms.length ? Object.fromEntries(NIX_COUNTS.map((key) => [key, platforms.reduce((sum, one) => sum + (one[key] || 0), 0)])) : state.data;
      const underWay = state.current === "building" || ended;
      if (!NIX_COUNTS.some((key) => d[key])) return underWay ? state.messages.building : "nothing to build: all in the Nix store";
      return nixWork(d, !underWay, ended);
    }
    if (stage === "layering" && d.paths !== undefined) return `${d.paths} store paths`;
    if (stage === "compressing" && d.layers_total !== undefined) {
      let text = `${d.layers_done || 0}/${d.layers_total} layers · ${d.layers_created || 0} new, ${size(d.compressed_bytes || 0)} compressed`;
      const speed = state.compressStarted === null ? null : rate(d.compressed_bytes || 0, state.lastTime - state.compressStarted);
      if (speed) text += ` · ${speed}`;
      return text;
    }
    if (stage === "done" && d.digest) return `${size(d.size)} in ${d.layers} layers`;
    return state.messages[stage] || "";
  }

  function renderStages() {
    const finished = FINAL.includes(state.current);
    let furthest = -1;
    for (const s of state.reached) furthest = Math.max(furthest, ORDER.indexOf(s));
    // The stage a failed (or stopped) build ended in: not shown as done.
    const endedIn = state.current === "failed" && furthest >= 0 && furthest < ORDER.indexOf("done") ? ORDER[furthest] : null;
    const items = ORDER.map((stage, position) => {
      if (stage === "done" && state.current === "failed") {
        return `<li class="failed" data-stage="failed"><span class="label">Failed</span><span class="detail">${esc(state.messages.failed || "")}</span></li>`;
      }
      let cls = "pending";
      if (stage === state.current && !finished) cls = "current";
      else if (stage === endedIn) cls = "ended";
      else if (state.reached.has(stage)) cls = "past";
      else if (position < furthest) cls = "skipped";
      const label = document.querySelector(`#stages li[data-stage="${stage}"] .label`);
      const text = ["past", "current", "ended"].includes(cls) ? detail(stage, cls === "ended") : "";
      return `<li class="${cls}" data-stage="${stage}"><span class="label">${esc(label ? label.textContent : stage)}</span><span class="detail">${esc(text)}</span></li>`;
    });
    document.getElementById("stages").innerHTML = items.join("");
    const badge = document.getElementById("state");
    badge.textContent = state.current;
    badge.className = `badge stage-${state.current}`;
    root.dataset.stage = state.current;
    const verb = { done: "Built", failed: "Could not build" }[state.current];
    if (verb) {
      document.getElementById("verb").textContent = verb;
      document.title = document.title.replace(/^Building /, `${verb} `);  // the tab says the build ended
    }
  }

  // The outcome as the server renders it (web.py's _outcome, guidance.py).
  function renderOutcome() {
    const outcome = document.getElementById("outcome");
    const d = state.data;
    const asked = root.querySelector("h1 code").textContent;
    if (state.current === "done" && d.digest) {
      const name = d.image || asked;  // the image's own name: as first asked for, resolved
      const note = name === asked ? "" : `<p class="hint" id="same-image"><code>${esc(asked)}</code> is this image: the order and the case of the names do not change it.</p>`;
      outcome.className = "outcome done";
      outcome.innerHTML = `<p><strong>Image ready.</strong> ${esc(size(d.size))} in ${esc(d.layers)} layers.</p>${note}
<p class="digest">Digest <code id="digest">${esc(d.digest)}</code></p>${platformDigests(d.platforms)}
${root.dataset.partOf ? "" : `<pre class="command" data-copy><code>docker pull ${esc(`${location.host}/${name}${tag === "latest" ? "" : `:${tag}`}`)}</code></pre>
<p><a href="${esc(imagePath(name))}">Layers and store paths</a></p>`}`;
      outcome.hidden = false;
      addCopyButtons();  // nixery.js's, as on the page the server draws
    } else if (state.current === "failed" && d.error === "stopped") {  // the registry shut down
      outcome.className = "outcome failed";
      const tagField = tag === "latest" ? "" : `<input type="hidden" name="tag" value="${esc(tag)}">`;
      outcome.innerHTML = `<p><strong>The registry stopped this build as it shut down.</strong></p><p class="message" id="error">${esc(state.messages.failed || "")}</p>
<div class="suggestion" id="build-again"><form method="post" action="/builds" class="inline"><input type="hidden" name="image" value="${esc(asked)}">${tagField}<button type="submit" class="small">Build ${esc(asked)} again</button></form></div>`;
      outcome.hidden = false;
    } else if (state.current === "failed") {
      outcome.className = "outcome failed";
      const log = d.log ? `<details open><summary>Nix's last lines</summary><pre>${esc(d.log)}</pre></details>` : "";
      outcome.innerHTML = `<p><strong>The build failed.</strong></p><p class="message" id="error">${esc(state.messages.failed || "")}</p>${suggestion(asked, d.suggestions, d.missing)}${log}`;
      outcome.hidden = false;
    }
  }

  // The image as the build's tag names it (guidance.py's pull_reference and image_path).
  const tag = root.dataset.tag || "latest";
  function imagePath(name) {
    const path = `/images/${name.split("/").map(encodeURIComponent).join("/")}`;
    return tag === "latest" ? path : `${path}?${new URLSearchParams({ tag })}`;
  }

  function platformDigests(platforms) {
    const each = (platforms || []).filter((one) => typeof one === "object");
    if (!each.length) return "";
    const rows = each.map((one) => `<li><code>${esc(one.platform)}</code> <code class="digest">${esc(one.oci_digest)}</code></li>`);
    return `<p class="hint">The digest of the image index; each platform's manifest:</p><ul id="platform-digests">${rows.join("")}</ul>`;
  }

  // A Build button for the name with each missing package replaced by its nearest name.
  function suggestion(asked, suggestions, missing) {
    if (!suggestions) return "";
    if ((missing || []).some((name) => !(suggestions[name] && suggestions[name].length))) return "";  // it would fail too
    const parts = asked.split("/");
    const fixed = parts.map((part) => (suggestions[part] && suggestions[part].length ? suggestions[part][0] : part));
    if (fixed.join("/") === asked) return "";
    const name = fixed.join("/");
    return `<div class="suggestion"><form method="post" action="/builds" class="inline"><input type="hidden" name="image" value="${esc(name)}">${tag === "latest" ? "" : `<input type="hidden" name="tag" value="${esc(tag)}">`}<button type="submit" class="small">Build ${esc(name)} instead</button></form></div>`;
  }

  // The event list is newest first, as the server draws it (builds.py's _event_items): a new
  // event goes on top, and a reader who scrolled down to older ones keeps their place.
  const events = document.getElementById("events");
  function addEvent(event) {
    const item = document.createElement("li");
    item.dataset.index = event.index;
    item.innerHTML = `<span class="t">+${(event.time - started).toFixed(1)}s</span> <span class="badge stage-${esc(event.stage)}">${esc(event.stage)}</span> ${event.platform ? `<code>${esc(event.platform)}</code> ${esc(event.platform_stage)}: ` : ""}${esc(event.message)}`;
    const height = events.scrollHeight;
    events.prepend(item);
    // The browser's own scroll anchoring is off (style.css): Safari has none.
    if (events.scrollTop > 0) events.scrollTop += events.scrollHeight - height;
    while (events.children.length > SHOWN) events.removeChild(events.lastElementChild);
  }

  // The page already shows events [0, n): fetch them once for the numbers, then follow.
  async function start() {
    const shown = parseInt(root.dataset.events, 10) || 0;
    if (FINAL.includes(root.dataset.stage)) return;
    try {
      const response = await fetch(`/builds/${root.dataset.id}.json`, { headers: { Accept: "application/json" } });
      const doc = await response.json();
      for (const event of doc.events.slice(0, shown)) add(event);
    } catch (e) {
      /* numbers fill in as events arrive */
    }
    const source = new EventSource(`/builds/${root.dataset.id}/events?after=${shown}`);
    const onEvent = (message) => {
      const event = JSON.parse(message.data);
      add(event);
      addEvent(event);
      renderStages();
      renderOutcome();
      if (FINAL.includes(event.stage)) source.close();
    };
    for (const stage of [...ORDER, "failed"]) source.addEventListener(stage, onEvent);
    source.onmessage = onEvent;
    // EventSource retries while the registry is unreachable, and gives up on an error answer:
    // after a restart the build is forgotten (404). The page then asks the server again, which
    // says so and what became of the image.
    source.onerror = async () => {
      if (source.readyState !== EventSource.CLOSED || FINAL.includes(state.current)) return;
      const response = await fetch(`/builds/${root.dataset.id}.json`, { headers: { Accept: "application/json" } });
      if (response.status === 404) location.reload();
    };
  }
  start();
})();
