// featurebank page, the data-quality view: the Quality pass's findings, each with its
// evidence and the actions that fix it (relabel, drop from split, delete, keep).
// Loaded after page.js, whose helpers (el, api, postJSON, thumb, tile, showMessage,
// loadInfo, state) it uses.
"use strict";

const QUALITY_LISTS = ["quality-summary", "quality-labels", "quality-duplicates", "quality-leaks", "quality-outliers",
  "quality-splits"];
const HELD_OUT = ["val", "test"];
const READ_ONLY = "this page's token may only read: start featurebank ui with a write token to act on findings";
const deleted = new Set();  // keys deleted from this view: a group's keep skips their pairs

function resetQuality() {  // what was shown belongs to the old bank
  for (const id of QUALITY_LISTS) $(id).replaceChildren();
  deleted.clear();
  $("quality-summary").dataset.loaded = "";
}

async function loadQuality(event) {
  if (event) event.preventDefault();
  const summary = $("quality-summary");
  summary.dataset.loaded = "1";
  summary.replaceChildren(el("span", { class: "muted" }, "running the pass…"));
  const precision = $("quality-precision").value;
  const n = $("quality-n").value;
  try {
    const r = await api(`/api/quality?n=${encodeURIComponent(n)}&precision=${encodeURIComponent(precision)}`);
    summary.replaceChildren(...qualitySummary(r));
    fill("quality-labels", r.label_errors.map(labelRow),
      r.has_labels ? "No label looks wrong." : "The bank has no labels yet.");
    fill("quality-duplicates", r.duplicates.map((g) => groupRow(g, r.duplicate_threshold)), "No duplicates.");
    fill("quality-leaks", r.leaks.map(leakRow), "No leaks.");
    fill("quality-outliers", r.outliers.map(outlierRow), "No outliers.");
    fill("quality-splits", (r.splits || []).map(splitRow), "No val or test items beside train ones.");
    showMessage("");
  } catch (e) {
    summary.replaceChildren();
    summary.dataset.loaded = "";
    showMessage(e.message, true);
  }
}

function fill(id, rows, none) {
  $(id).replaceChildren(...(rows.length ? rows : [el("p", { class: "muted" }, none)]));
}

function qualitySummary(r) {
  const out = [el("p", {}, `${r.items} items, ${r.labelled} labelled · the pass took ${r.seconds.toFixed(2)} s` +
    ` over index generation ${r.index_generation}`)];
  if (r.has_labels) {
    out.push(el("p", {}, el("b", {}, `Estimated wrong labels: ${Math.round(r.estimated_wrong)}. `),
      `${r.label_selected} of the ${r.label_candidates} the neighbours relabel are listed ` +
      `(cut by ${r.label_cut}, estimated precision ${r.label_estimated_precision.toFixed(2)}).`));
    out.push(el("table", { id: "quality-classes" },
      el("tr", {}, el("th", {}, "class"), el("th", {}, "items"), el("th", {}, "estimated wrong")),
      ...r.classes.map((c) => el("tr", {}, el("td", {}, c.label), el("td", {}, c.items), el("td", {}, c.wrong.toFixed(1))))));
    if (r.swaps.length) {
      out.push(el("p", { id: "quality-swaps" }, "Most swapped: ",
        ...r.swaps.map((x) => el("span", { class: "swap" }, el("b", {}, `${x.a} ↔ ${x.b}`), ` about ${Math.round(x.count)}; `))));
    }
  }
  const c = r.counts;
  out.push(el("p", { class: "muted" }, `${c.duplicate_groups || 0} duplicate groups (${c.exact_groups || 0} exact), ` +
    `${c.leaks || 0} leaks, ${c.outliers || 0} outliers` +
    (c.kept ? ` · ${c.kept} findings kept earlier are not listed` : "")));
  return out;
}

// One action on a finding: the call, then `node` shows what it did (or the server's refusal);
// true when it was done.
async function act(node, what, call, outcome) {
  if (node.dataset.busy) return false;
  node.dataset.busy = "1";
  try {
    await call();
    settle(node, outcome);
    showMessage(outcome);
    loadInfo();  // the header's counts
    return true;
  } catch (e) {
    showMessage(`${what}: ${e.message}` + (e.code === "PERMISSION_DENIED" ? ` (${READ_ONLY})` : ""), true);
    return false;
  } finally {
    delete node.dataset.busy;
  }
}

function settle(node, outcome) {
  node.classList.add(node.classList.contains("member") ? "gone" : "done");
  node.querySelectorAll("button, select").forEach((b) => { b.disabled = true; });
  const shown = node.querySelector(":scope > .outcome, :scope > .what > .outcome");
  if (shown) shown.textContent = outcome;
}

// An item deleted (or moved out of its split): the other findings about it say so too.
const ABOUT_AN_ITEM = "#view-quality .finding[data-key], #view-quality .member[data-key]";
const ABOUT_ITS_SPLIT = "#view-quality .finding[data-kind=leak], #view-quality .member[data-key]";

function settleKey(key, outcome, selector) {
  for (const node of document.querySelectorAll(selector)) {
    const about = node.dataset.key === key || node.dataset.train === key;  // a leak is about both
    if (about && !node.classList.contains("done") && !node.classList.contains("gone")) settle(node, outcome);
  }
}

function button(cls, text, onclick) {
  return el("button", { class: cls, onclick }, text);
}

const keepFinding = (kind, keys) => postJSON("/api/keep", { kind, keys });
const deleteKey = (key) => postJSON("/api/delete", { keys: [key] });
const moveToSplit = (key, split) => postJSON("/api/splits", { splits: { [key]: split } });
const dropFromSplit = (key) => moveToSplit(key, "none");

// `short`: the button sits on the item's own tile, so it need not name it
function deleteButton(node, key, short = false) {
  const outcome = `${key} deleted`;
  return button("delete", short ? "Delete" : `Delete ${key}`, async () => {
    if (await act(node, `delete ${key}`, () => deleteKey(key), outcome)) {
      deleted.add(key);
      settleKey(key, outcome, ABOUT_AN_ITEM);
    }
  });
}

function dropButton(node, key, split, short = false) {
  const outcome = `${key} moved from ${split} to none`;
  return button("drop", short ? `Drop from ${split}` : `Drop ${key} from ${split}`, async () => {
    if (await act(node, `move ${key} out of ${split}`, () => dropFromSplit(key), outcome)) {
      settleKey(key, outcome, ABOUT_ITS_SPLIT);
    }
  });
}

function labelRow(f) {
  const row = el("div", { class: "finding", "data-kind": "label", "data-key": f.key });
  const choices = [...new Set([f.suggested, ...state.labels])];
  const to = el("select", { class: "relabel-to" }, ...choices.map((l) => el("option", { value: l }, l)));
  const head = f.has_head ? ` · head ${f.head_p_label.toFixed(2)} → ${f.head_p_suggested.toFixed(2)}` : "";
  row.append(
    thumb(f.key),
    el("div", { class: "what" },
      el("div", {}, el("b", {}, f.key)),
      el("div", {}, `labelled ${f.label}, looks like `, el("b", { class: "suggested" }, f.suggested)),
      el("div", { class: "muted" }, `p(${f.label}) ${f.p_label.toFixed(3)} · p(${f.suggested}) ` +
        `${f.p_suggested.toFixed(3)} · confidence ${f.confidence.toFixed(3)}${head}`),
      el("div", { class: "actions" },
        to, button("relabel", "Relabel", () => act(row, `relabel ${f.key}`,
          () => postJSON("/api/labels", { labels: { [f.key]: to.value } }), `${f.key} relabelled ${f.label} → ${to.value}`)),
        button("keep", `Keep ${f.label}`, () => act(row, `keep ${f.key}`,
          () => keepFinding("label", [f.key]), `${f.key} kept as ${f.label}`)),
        deleteButton(row, f.key)),
      el("div", { class: "outcome" })),
    el("div", { class: "evidence" }, ...f.neighbors.map((n) => tile(n.key, n.label, n.score))));
  return row;
}

function splitTile(key, split) {  // an item of a pair, with the split it is in
  return el("div", { class: "member-tile" }, tile(key, "", undefined), el("div", { class: "muted" }, split));
}

function groupRow(g, threshold) {
  const keys = g.members.map((m) => m.key);
  const row = el("div", { class: "finding", "data-kind": "duplicate", "data-keys": keys.join(" ") });
  const closest = Math.min(...g.pairs.map((p) => p.distance));
  const members = g.members.map((m) => {
    const member = el("div", { class: "member", "data-key": m.key },
      tile(m.key, m.label, undefined), el("div", { class: "muted" }, m.split));
    member.append(deleteButton(member, m.key, true));
    if (HELD_OUT.includes(m.split)) member.append(dropButton(member, m.key, m.split, true));
    member.append(el("div", { class: "outcome" }));
    return member;
  });
  row.append(
    el("div", { class: "what" },
      el("div", {}, el("b", {}, g.exact ? `${keys.length} exact copies` : `${keys.length} near copies`)),
      el("div", { class: "muted" }, g.exact ? "same content sha256"
        : `distance ${closest.toFixed(4)} (near below ${threshold.toFixed(4)}, or thumbnails that match)`),
      ...g.pairs.map((p) => el("div", { class: "muted pair" },
        `${p.a} ~ ${p.b} ${p.exact ? "exact" : p.distance.toFixed(4)}${p.match ? `, thumbnails match ${p.match.toFixed(4)}` : ""}`)),
      el("div", { class: "actions" }, button("keep", "Keep them all", () => act(row, "keep the group",
        async () => {
          for (const p of g.pairs) if (!deleted.has(p.a) && !deleted.has(p.b)) await keepFinding("duplicate", [p.a, p.b]);
        },
        `kept ${keys.join(", ")}`))),
      el("div", { class: "outcome" })),
    el("div", { class: "evidence" }, ...members));
  return row;
}

function leakRow(x) {
  const row = el("div", { class: "finding", "data-kind": "leak", "data-key": x.held_out, "data-train": x.train });
  row.append(
    el("div", { class: "what" },
      el("div", {}, el("b", {}, x.held_out), ` in ${x.split} copies `, el("b", {}, x.train), " in train"),
      el("div", { class: "muted" }, x.exact ? "same content sha256" : `distance ${x.distance.toFixed(4)}`),
      el("div", { class: "actions" },
        dropButton(row, x.held_out, x.split), deleteButton(row, x.held_out),
        button("keep", "Keep", () => act(row, `keep the leak ${x.held_out}`,
          () => keepFinding("duplicate", [x.train, x.held_out]), `kept ${x.held_out} in ${x.split}`))),
      el("div", { class: "outcome" })),
    el("div", { class: "evidence" }, splitTile(x.train, "train"), splitTile(x.held_out, x.split)));
  return row;
}

function outlierRow(o) {
  const row = el("div", { class: "finding", "data-kind": "outlier", "data-key": o.key });
  row.append(
    thumb(o.key),
    el("div", { class: "what" },
      el("div", {}, el("b", {}, o.key)),
      el("div", { class: "muted" }, `score ${o.score.toFixed(2)} · mean distance ${o.distance.toFixed(4)} to its neighbours`),
      el("div", { class: "actions" }, deleteButton(row, o.key),
        button("keep", "Keep", () => act(row, `keep ${o.key}`, () => keepFinding("outlier", [o.key]), `${o.key} kept`))),
      el("div", { class: "outcome" })),
    el("div", { class: "evidence" }, ...o.neighbors.map((n) => tile(n.key, "", n.distance))));
  return row;
}

function uncoveredMember(key, split) {  // an item train has nothing like: train could learn from it, or it goes
  const member = el("div", { class: "member", "data-key": key }, tile(key, "", undefined),
    el("div", { class: "muted" }, split));
  const outcome = `${key} moved from ${split} to train`;
  member.append(
    button("train", "Move to train", async () => {
      if (await act(member, `move ${key} to train`, () => moveToSplit(key, "train"), outcome)) {
        settleKey(key, outcome, ABOUT_ITS_SPLIT);
      }
    }),
    dropButton(member, key, split, true), el("div", { class: "outcome" }));
  return member;
}

function splitRow(c) {  // a held-out split against train: what it lacks, and its items train has nothing near
  const share = c.items ? (100 * (c.uncovered || 0) / c.items).toFixed(1) : "0.0";
  const missing = ((c.missing_labels || []).length ? `, no item labelled ${c.missing_labels.join(", ")}` : "") +
    ((c.unseen_labels || []).length ? `, labels train has none of: ${c.unseen_labels.join(", ")}` : "");
  const row = el("div", { class: "finding", "data-kind": "split", "data-key": c.split });
  row.append(
    el("div", { class: "what" },
      el("div", {}, el("b", {}, `${c.split}: ${c.items} items, ${c.uncovered || 0} unlike every train item (${share} %)`)),
      el("div", { class: "muted" }, `label shares ${(c.label_distance || 0).toFixed(2)} from train's (total variation)${missing}`)),
    el("div", { class: "evidence" }, ...(c.uncovered_keys || []).map((k) => uncoveredMember(k, c.split))));
  return row;
}

$("quality-form").addEventListener("submit", loadQuality);
