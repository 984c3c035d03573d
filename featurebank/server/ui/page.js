// featurebank labelling page: plain JavaScript over the page's JSON API (no build step).
"use strict";

const KEY_POOL = "1234567890abcdefghijklmnopqrtvwxy";  // space skips, backspace undoes
const state = {
  labels: [], keymap: {}, queue: [], pos: 0, history: [], busy: false,
  bank: new URLSearchParams(location.search).get("bank") || "",  // "" = the server's default
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function showMessage(text, error = false) {
  const m = $("message");
  m.textContent = text;
  m.className = error ? "error" : "";
  m.hidden = !text;
}

// Every call names the chosen bank (a server may serve many); none = the default bank.
function withBank(path) {
  if (!state.bank) return path;
  return path + (path.includes("?") ? "&" : "?") + "bank=" + encodeURIComponent(state.bank);
}

async function api(path, options = {}) {
  const response = await fetch(withBank(path), options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.error || `${response.status} ${response.statusText}`);
    error.code = data.code || "";  // the gRPC status name, e.g. PERMISSION_DENIED
    throw error;
  }
  return data;
}

function postJSON(path, payload) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
}

function thumb(key, big = false) {
  const img = el("img", { src: withBank("/api/thumb?key=" + encodeURIComponent(key)), alt: key });
  if (big) img.className = "big";
  img.addEventListener("error", () => img.replaceWith(el("div", { class: "noimg" + (big ? " big" : "") }, "no image")));
  return img;
}

function tile(key, label, score) {
  return el("div", { class: "tile", "data-key": key },
    thumb(key),
    el("div", { class: "lab" }, label || "—"),
    el("div", { class: "key", title: key }, key),
    score === undefined ? "" : el("div", { class: "muted" }, Number(score).toFixed(3)));
}

// ---------------------------------------------------------------- views

function activate() {
  const view = (location.hash || "#search").slice(1);
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("active", s.id === "view-" + view);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  if (view === "audit" && !$("audit-list").dataset.loaded) loadAudit();
  if (view === "quality" && !$("quality-summary").dataset.loaded) loadQuality();
  if (view === "report") $("report-frame").src = withBank("/report?t=" + Date.now());
}

async function loadBanks() {
  const r = await api("/api/banks");
  const names = r.banks.map((b) => b.name);
  if (!state.bank && !r.default && names.length) state.bank = names[0];
  const choice = $("bank-choice");
  choice.replaceChildren(...r.banks.map((b) =>
    el("option", { value: b.name }, b.name + (b.name === r.default ? " (default)" : ""))));
  choice.value = state.bank || r.default;
  $("bank-label").hidden = names.length < 2;
}

function chooseBank() {
  state.bank = $("bank-choice").value;
  history.replaceState(null, "", "?bank=" + encodeURIComponent(state.bank) + location.hash);
  state.queue = []; state.pos = 0; state.history = [];  // what was shown belongs to the old bank
  for (const id of ["search-results", "search-guess", "queue-card", "queue-done", "audit-list"]) $(id).replaceChildren();
  $("audit-list").dataset.loaded = "";
  resetQuality();
  showMessage("");
  loadInfo();
  activate();
}

async function loadInfo() {
  try {
    const info = await api("/api/info");
    state.labels = info.labels;
    state.keymap = assignKeys(info.labels);
    $("bank-info").textContent =
      `${info.count} items, ${info.labelled} labelled, ${info.labels.length} labels · index generation ${info.index_generation}` +
      (info.head_generation ? ` · head ${info.head_generation}${info.head_stale ? " (stale)" : ""}` : "");
    renderLegend();
  } catch (e) {
    showMessage("cannot reach the server: " + e.message, true);
  }
}

function assignKeys(labels) {
  const map = {};
  const used = new Set();
  for (const l of labels) {
    const k = l.toLowerCase();
    if (l.length === 1 && KEY_POOL.includes(k) && !used.has(k)) { map[k] = l; used.add(k); }
  }
  const keyed = new Set(Object.values(map));
  for (const l of labels) {
    if (keyed.has(l)) continue;
    const k = [...KEY_POOL].find((c) => !used.has(c));
    if (!k) break;  // more classes than keys: the rest are not on the keyboard
    map[k] = l; used.add(k);
  }
  return map;
}

// ---------------------------------------------------------------- search

async function search(event) {
  event.preventDefault();
  const form = new FormData();
  const file = $("search-image").files[0];
  const key = $("search-key").value.trim();
  if (file) form.append("image", file);
  else if (key) form.append("key", key);
  else return showMessage("choose an image or type a key", true);
  const filter = $("search-filter").value.trim();
  if (filter) form.append("filter", filter);
  $("search-results").replaceChildren(el("span", { class: "muted" }, "searching…"));
  try {
    const r = await api("/api/search", { method: "POST", body: form });
    $("search-guess").replaceChildren(el("p", { class: "guess" }, "The bank says: ",
      ...r.labels.map((x) => el("span", {}, el("b", {}, x.label), " " + x.probability.toFixed(3)))));
    $("search-results").replaceChildren(...r.neighbors.map((n) => tile(n.key, n.label, n.score)));
    showMessage("");
  } catch (e) {
    $("search-results").replaceChildren();
    showMessage(e.message, true);
  }
}

// ---------------------------------------------------------------- suggestion queue

function renderLegend() {
  const parts = Object.entries(state.keymap).map(([k, l]) => el("span", {}, el("kbd", {}, k), " " + l));
  parts.push(el("span", {}, el("kbd", {}, "space"), " skip"));
  parts.push(el("span", {}, el("kbd", {}, "backspace"), " undo"));
  $("keys-legend").replaceChildren(...parts);
}

async function loadQueue(event) {
  if (event) event.preventDefault();
  const strategy = $("suggest-strategy").value;
  const n = $("suggest-n").value;
  $("queue-status").textContent = "ranking…";
  try {
    const r = await api(`/api/suggest?strategy=${encodeURIComponent(strategy)}&n=${encodeURIComponent(n)}`);
    state.queue = r.suggestions;
    state.pos = 0;
    state.history = [];
    $("queue-done").replaceChildren();
    renderCard();
    showMessage("");
  } catch (e) {
    $("queue-status").textContent = "";
    showMessage(e.message, true);
  }
}

function renderCard() {
  const item = state.queue[state.pos];
  const status = $("queue-status");
  if (!item) {
    $("queue-card").replaceChildren(el("p", {}, state.queue.length
      ? "Queue done. Rebuild to learn from the new labels, then load a new queue."
      : "Nothing to suggest."));
    status.textContent = `${state.history.filter((h) => h.label).length} labelled`;
    return;
  }
  const guesses = (item.labels || []).map((x) => el("li", {}, `${x.label} ${x.probability.toFixed(3)}`));
  $("queue-card").replaceChildren(
    thumb(item.key, true),
    el("div", {},
      el("p", {}, el("b", { id: "queue-key" }, item.key)),
      el("p", { class: "muted" }, `uncertainty ${item.score.toFixed(3)}`),
      el("p", {}, "The bank guesses:"), el("ol", {}, ...guesses)));
  status.textContent = `item ${state.pos + 1} of ${state.queue.length}`;
}

async function labelCurrent(label) {
  const item = state.queue[state.pos];
  if (!item || state.busy) return;
  state.busy = true;
  try {
    if (label !== null) await postJSON("/api/labels", { labels: { [item.key]: label } });
    state.history.push({ key: item.key, label });
    $("queue-done").prepend(el("li", { "data-key": item.key }, label === null ? `${item.key}: skipped` : `${item.key} → ${label}`));
    state.pos += 1;
    renderCard();
    showMessage("");
    if (label !== null) loadInfo();  // the header's labelled count
  } catch (e) {
    showMessage(e.message, true);
  } finally {
    state.busy = false;
  }
}

async function undo() {
  const last = state.history[state.history.length - 1];
  if (!last || state.busy) return;
  state.busy = true;
  try {
    if (last.label !== null) await postJSON("/api/labels", { labels: { [last.key]: null } });
    state.history.pop();
    state.pos -= 1;
    $("queue-done").firstElementChild?.remove();
    renderCard();
    showMessage(last.label === null ? `back to ${last.key}` : `label of ${last.key} cleared`);
  } catch (e) {
    showMessage(e.message, true);
  } finally {
    state.busy = false;
  }
}

function onKey(event) {
  if (!$("view-label").classList.contains("active")) return;
  const tag = event.target.tagName;
  if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === " ") { event.preventDefault(); labelCurrent(null); return; }
  if (event.key === "Backspace") { event.preventDefault(); undo(); return; }
  const label = state.keymap[event.key.toLowerCase()];
  if (label !== undefined) { event.preventDefault(); labelCurrent(label); }
}

// ---------------------------------------------------------------- audit

function rejected() {
  try { return new Set(JSON.parse(localStorage.getItem("featurebank-rejected") || "[]")); }
  catch { return new Set(); }
}

function remember(id) {
  const all = rejected();
  all.add(id);
  localStorage.setItem("featurebank-rejected", JSON.stringify([...all]));
}

async function loadAudit() {
  const list = $("audit-list");
  list.dataset.loaded = "1";
  list.replaceChildren(el("span", { class: "muted" }, "auditing…"));
  try {
    const r = await api("/api/audit?n=50");
    const skip = rejected();
    const findings = r.findings.filter((f) => !skip.has(`${f.key}|${f.label}|${f.suggested}`));
    list.replaceChildren(...(findings.length ? findings.map(findingRow)
      : [el("p", {}, "The bank agrees with every label.")]));
  } catch (e) {
    list.replaceChildren();
    showMessage(e.message, true);
  }
}

function findingRow(f) {
  const id = `${f.key}|${f.label}|${f.suggested}`;
  const row = el("div", { class: "finding", "data-key": f.key });
  const head = f.has_head ? ` · head ${f.head_p_label.toFixed(2)} → ${f.head_p_suggested.toFixed(2)}` : "";
  const accept = el("button", { class: "accept", onclick: async () => {
    try {
      await postJSON("/api/labels", { labels: { [f.key]: f.suggested } });
      row.classList.add("accepted");
      row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
      showMessage(`${f.key} relabelled ${f.label} → ${f.suggested}`);
      loadInfo();
    } catch (e) { showMessage(e.message, true); }
  } }, `Accept ${f.suggested}`);
  const reject = el("button", { class: "reject", onclick: () => {
    remember(id);
    row.classList.add("rejected");
    row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  } }, `Keep ${f.label}`);
  row.append(
    thumb(f.key),
    el("div", { class: "what" },
      el("div", {}, el("b", {}, f.key)),
      el("div", {}, `labelled ${f.label}, looks like `, el("b", {}, f.suggested)),
      el("div", { class: "muted" }, `confidence ${f.confidence.toFixed(3)}${head}`),
      el("div", {}, accept, " ", reject)),
    el("div", { class: "evidence" }, ...f.neighbors.map((n) => tile(n.key, n.label, n.score))));
  return row;
}

// ---------------------------------------------------------------- rebuild

async function rebuild() {
  const button = $("rebuild-start");
  button.disabled = true;
  try {
    let op = await postJSON("/api/rebuild", { retrain_head: $("rebuild-head").checked });
    while (!op.done) {
      showRebuild(op);
      await new Promise((r) => setTimeout(r, 400));
      op = await api("/api/operation/" + encodeURIComponent(op.id));
    }
    showRebuild(op);
    if (op.error && op.error.code) showMessage(`rebuild failed: ${op.error.message}`, true);
    else {
      const head = Number(op.head_generation);  // int64 fields arrive as strings
      showMessage(`rebuilt: index generation ${op.index_generation}` + (head ? `, head generation ${head}` : ""));
      $("audit-list").dataset.loaded = "";
      loadInfo();
    }
  } catch (e) {
    showMessage(e.message, true);
  } finally {
    button.disabled = false;
  }
}

function showRebuild(op) {
  $("rebuild-bar").style.width = `${Math.round(100 * (op.progress || 0))}%`;
  $("rebuild-status").textContent = `${op.stage} (${Math.round(100 * (op.progress || 0))}%)`;
}

// ---------------------------------------------------------------- start

$("search-form").addEventListener("submit", search);
$("suggest-form").addEventListener("submit", loadQueue);
$("audit-load").addEventListener("click", loadAudit);
$("rebuild-start").addEventListener("click", rebuild);
document.addEventListener("keydown", onKey);
window.addEventListener("hashchange", () => { showMessage(""); activate(); });
$("bank-choice").addEventListener("change", chooseBank);
loadBanks().catch((e) => showMessage("cannot list the banks: " + e.message, true)).then(() => {
  loadInfo();
  activate();
});
