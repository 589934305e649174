// The dashboard: one page, three views (sign in, overview, database), over the operator API (/api/...).
// The session cookie authenticates; every change also sends the session's CSRF token.
"use strict";

const session = { scope: null, csrf: null };
let refresh = null;
let shown = 0; // the view on screen: bumped by every render, so a view's late answers and timers know they are stale

// -- helpers ----------------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === "style") node.style.cssText = v; // CSSOM, which the page's CSP allows (a style attribute it would not)
    else if (v === true) node.setAttribute(k, "");
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(method, path, { json, raw } = {}) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = session.csrf || "";
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (raw !== undefined) { headers["Content-Type"] = "application/octet-stream"; body = raw; }
  const resp = await fetch(path, { method, headers, body, credentials: "same-origin" });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new Error((data && data.error) ? `${data.code}: ${data.error}` : `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

// A 401 is a session that ended, or a token that does not grant the cluster asked for: only the first signs out.
async function sessionEnded(err) {
  if (err.status !== 401) return false;
  try { await api("GET", "/ui/session"); return false; } catch (e) { return true; }
}

const qs = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v)).toString();
const bytes = (n) => n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(1)} GiB` : n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB`
  : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`;
const when = (epochSeconds) => epochSeconds ? new Date(epochSeconds * 1000).toISOString().replace(".000Z", "Z") : "—";
// A datetime-local value is read as UTC, as every time on these pages is shown.
const utc = (local) => local ? (local.length === 16 ? `${local}:00Z` : `${local}Z`) : "";

function target(prefix) {
  const time = document.getElementById(`${prefix}-time`).value;
  const txid = document.getElementById(`${prefix}-txid`).value.trim();
  return { timestamp: utc(time), txid };
}

// -- views ------------------------------------------------------------------------------------------------

function render(...nodes) {
  shown += 1;
  if (refresh) { clearInterval(refresh); refresh = null; }
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function loginView(message) {
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  const token = el("input", { type: "password", id: "token", placeholder: "admin or cluster token", autocomplete: "off" });
  const problem = el("p", { id: "login-error", class: "muted" }, message || "");
  const form = el("form", { id: "login", on: { submit: async (ev) => {
    ev.preventDefault();
    try {
      const s = await api("POST", "/ui/login", { json: { token: token.value } });
      Object.assign(session, s);
      showError("");
      route();
    } catch (err) {
      problem.textContent = err.message;
      problem.className = "error-text";
    }
  } } },
  el("h1", {}, "Sign in"),
  el("p", { class: "muted" }, "The admin token sees every cluster; a cluster token sees only its own."),
  el("div", { class: "row" }, token),
  el("div", { class: "row" }, el("button", { type: "submit", class: "primary", id: "sign-in" }, "Sign in")),
  problem);
  render(el("section", { class: "login" }, form));
  token.focus();
}

async function overviewView() {
  const table = el("table", { id: "databases" });
  const stamp = el("span", { class: "muted", id: "updated" });
  render(el("h1", {}, "Backups"), el("section", {}, table, el("p", {}, stamp)));
  const view = shown;
  const load = async () => {
    try {
      const data = await api("GET", "/api/databases");
      if (view !== shown) return; // another view replaced this one while the answer came
      const rows = [];
      for (const c of data.clusters) {
        for (const d of c.databases) {
          const failing = Object.entries(d.failing || {});
          rows.push(el("tr", { "data-db": `${c.name}/${d.name}`, class: failing.length ? "failing" : null },
            el("td", {}, c.name),
            el("td", {}, el("a", { href: `#/db/${encodeURIComponent(c.name)}/${encodeURIComponent(d.name)}` }, d.name),
              ...failing.map(([job, why]) => el("span", { class: "badge bad", title: why }, ` ${job} failing`))),
            el("td", { class: "mono" }, d.txid),
            el("td", { class: "mono" }, d.hwm),
            el("td", { class: "num" }, d.lag),
            el("td", { class: "num" }, bytes(d.size)),
            el("td", {}, when(d.lastUpload)),
            el("td", { class: "num" }, d.restorePoints)));
        }
      }
      if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No databases yet.")));
      table.replaceChildren(el("tr", {}, ...["cluster", "database", "position (TXID)", "HWM", "lag (TXIDs)", "size",
        "last upload", "restore points"].map((h, i) => el("th", { class: i >= 4 && i !== 6 ? "num" : null }, h))), ...rows);
      stamp.textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every 2 s.`;
      showError("");
    } catch (err) {
      if (view !== shown) return;
      if (err.status === 401) return loginView("Your session ended; sign in again.");
      showError(err.message);
    }
  };
  await load();
  if (view === shown) refresh = setInterval(load, 2000);
}

const KINDS = { 0: "flushes of uploads", 1: "compactions of L0", 2: "compactions of L1", 9: "snapshots" };
const every = (s) => s === null || s === undefined ? "—" : s <= 0 ? "every upload" : s % 3600 === 0 ? `every ${s / 3600} h`
  : s % 60 === 0 ? `every ${s / 60} min` : `every ${s} s`;

// One timeline per level (a TXID that two levels both end at shows on each), above a table saying which stretch
// of time each level can restore and at what granularity.
function timeline(points, levels, onPick) {
  if (!points.length) return el("p", { class: "muted" }, "No restore points yet.");
  const times = points.map((p) => Date.parse(p.timestamp));
  const lo = Math.min(...times), hi = Math.max(...times), span = Math.max(hi - lo, 1);
  const summary = el("table", { id: "levels" },
    el("tr", {}, ...["level", "restore points", "from", "to", "count"].map((h, i) => el("th", { class: i === 4 ? "num" : null }, h))),
    ...levels.map((lv) => el("tr", { "data-level": lv.level },
      el("td", {}, `L${lv.level} `, el("span", { class: "muted" }, KINDS[lv.level] || "")),
      el("td", {}, every(lv.interval)),
      el("td", { class: "mono" }, lv.oldest), el("td", { class: "mono" }, lv.newest),
      el("td", { class: "num" }, lv.points))));
  const rows = levels.map((lv) => {
    const level = lv.level;
    const mine = points.filter((p) => p.level === level);
    const bar = el("div", { class: "timeline", "data-level": level },
      ...mine.map((p) => el("span", {
        class: `point l${level}`, title: `L${level} · TXID ${p.txid} · ${p.timestamp}`,
        style: `left: ${(((Date.parse(p.timestamp) - lo) / span) * 100).toFixed(2)}%`,
        on: { click: () => onPick(p) } })));
    return el("div", {}, el("span", { class: "level-label" }, `L${level} (${every(lv.interval)}): ${mine.length} point${mine.length === 1 ? "" : "s"}`), bar);
  });
  return el("div", { id: "timeline" }, summary,
    el("p", { class: "muted" }, `${points[0].timestamp} → ${points[points.length - 1].timestamp}`), ...rows);
}

async function databaseView(cluster, name) {
  const ref = { cluster, db: name };
  const asked = location.hash;
  let info;
  try {
    info = await api("GET", `/api/db?${qs(ref)}`);
    if (location.hash !== asked) return; // the operator went elsewhere while the answer came
  } catch (err) {
    if (location.hash !== asked) return;
    if (await sessionEnded(err)) return loginView("Your session ended; sign in again.");
    render(el("p", {}, el("a", { href: "#/" }, "← all databases")));
    return showError(err.message);
  }
  showError("");
  const status = el("p", { id: "status" });
  const showStatus = (d) => status.replaceChildren(
    "Position ", el("code", {}, d.txid), " · HWM ", el("code", {}, d.hwm), ` · lag ${d.lag} · ${bytes(d.size)} stored · last upload ${when(d.lastUpload)}`,
    ...Object.entries(d.failing || {}).map(([job, why]) => el("p", { class: "failing" }, `${job} is failing: ${why}`)));
  showStatus(info);

  // Restore: preview, then a confirmation that names the database.
  const previewBox = el("div", { id: "preview", class: "preview", hidden: true });
  const confirmName = el("input", { type: "text", id: "confirm-name", autocomplete: "off", placeholder: name });
  const restoreBtn = el("button", { type: "button", id: "restore", class: "danger", disabled: true }, "I understand the consequences, restore");
  const confirmBox = el("div", { class: "confirm", id: "confirm", hidden: true },
    el("p", {}, "This appends the state above as the new head of ", el("b", {}, name),
      ". History is kept, so the restore can itself be undone; LiteFS then pulls the new state. Type the database name to confirm."),
    el("div", { class: "row" }, confirmName, restoreBtn));
  const result = el("p", { id: "restore-result", class: "ok" });
  let previewed = null;
  confirmName.addEventListener("input", () => { restoreBtn.disabled = confirmName.value !== name || !previewed; });
  const resetPreview = () => { previewed = null; previewBox.hidden = true; confirmBox.hidden = true; restoreBtn.disabled = true; };

  const preview = async () => {
    resetPreview();
    const t = target("restore");
    if (!t.timestamp && !t.txid) return showError("Choose a date and time or a TXID to preview.");
    try {
      const p = await api("GET", `/api/preview?${qs({ ...ref, ...t })}`);
      // Restore the TXID shown, not the time again: uploads since the preview could resolve it to a newer state.
      previewed = { txid: p.restored.txid };
      previewBox.replaceChildren(
        el("p", {}, "Would restore TXID ", el("code", { id: "preview-txid" }, p.restored.txid), " committed ",
          el("code", { id: "preview-time" }, p.restored.timestamp), ` (${bytes(p.size)}):`),
        el("table", { id: "preview-tables" }, el("tr", {}, el("th", {}, "table"), el("th", { class: "num" }, "rows")),
          ...p.tables.map((t2) => el("tr", { "data-table": t2.name }, el("td", {}, t2.name), el("td", { class: "num" }, t2.rows ?? "—")))));
      previewBox.hidden = false;
      confirmBox.hidden = false;
      confirmName.value = "";
      showError("");
    } catch (err) { showError(err.message); }
  };
  restoreBtn.addEventListener("click", async () => {
    restoreBtn.disabled = true;
    try {
      const r = await api("POST", `/api/restore?${qs(ref)}`, { json: { txid: previewed.txid } });
      result.textContent = `Restored TXID ${r.restored.txid} (${r.restored.timestamp}) as the new head, TXID ${r.txid}.`;
      resetPreview();
      showStatus(await api("GET", `/api/db?${qs(ref)}`));
      showError("");
    } catch (err) { showError(err.message); restoreBtn.disabled = false; }
  });

  const pick = (p) => {
    document.getElementById("restore-txid").value = p.txid;
    document.getElementById("restore-time").value = "";
    resetPreview();
  };

  // Download a snapshot: a plain link, so the browser saves the file.
  const dlLink = el("a", { id: "download-link", class: "button", download: name });
  const updateLink = () => { dlLink.href = `/api/download?${qs({ ...ref, ...target("download"), format: "sqlite" })}`; };

  const uploadFile = el("input", { type: "file", id: "upload-file" });
  const uploadResult = el("p", { id: "upload-result", class: "ok" });
  const upload = async () => {
    const file = uploadFile.files[0];
    if (!file) return showError("Choose a SQLite file to upload.");
    try {
      const r = await api("POST", `/api/upload?${qs(ref)}`, { raw: await file.arrayBuffer() });
      uploadResult.textContent = `Uploaded ${file.name} as TXID ${r.txid}.`;
      showStatus(await api("GET", `/api/db?${qs(ref)}`));
      showError("");
    } catch (err) { showError(err.message); }
  };

  const cloneCluster = el("input", { type: "text", id: "clone-cluster", placeholder: "target cluster" });
  const cloneName = el("input", { type: "text", id: "clone-name", placeholder: `name (default ${name})` });
  const cloneResult = el("p", { id: "clone-result", class: "ok" });
  const clone = async () => {
    try {
      const r = await api("POST", `/api/clone?${qs({ ...ref, to_cluster: cloneCluster.value.trim(), to_db: cloneName.value.trim() })}`);
      cloneResult.textContent = `Cloned into ${r.cluster}/${r.name} at TXID ${r.txid}.`;
      showError("");
    } catch (err) { showError(err.message); }
  };

  const when2 = (prefix, onChange) => [
    el("label", {}, "Date and time (UTC) ", el("input", { type: "datetime-local", step: "1", id: `${prefix}-time`, on: { input: onChange } })),
    el("span", { class: "muted" }, "or"),
    el("label", {}, "TXID ", el("input", { type: "text", id: `${prefix}-txid`, class: "mono", size: "18", on: { input: onChange } }))];

  render(
    el("p", {}, el("a", { href: "#/" }, "← all databases")),
    el("h1", {}, name, el("span", { class: "muted" }, ` in ${cluster}`)),
    status,
    el("section", {}, el("h2", {}, "Restore points"), timeline(info.points || [], info.levels || [], pick)),
    el("section", { id: "restore-section" }, el("h2", {}, "Restore"),
      el("div", { class: "row" }, ...when2("restore", resetPreview)),
      el("div", { class: "row" }, el("button", { type: "button", id: "preview-button", class: "primary", on: { click: preview } }, "Preview")),
      previewBox, confirmBox, result),
    el("section", {}, el("h2", {}, "Download a snapshot"),
      el("p", { class: "muted" }, "Leave both empty for the latest state."),
      el("div", { class: "row" }, ...when2("download", updateLink)),
      el("div", { class: "row" }, dlLink)),
    el("section", {}, el("h2", {}, "Upload a database"),
      el("p", { class: "muted" }, "The file becomes the database's new head transaction; the history before it is kept."),
      el("div", { class: "row" }, uploadFile, el("button", { type: "button", id: "upload", on: { click: upload } }, "Upload")),
      uploadResult),
    el("section", {}, el("h2", {}, "Clone into another cluster"),
      el("div", { class: "row" }, cloneCluster, cloneName, el("button", { type: "button", id: "clone", on: { click: clone } }, "Clone")),
      cloneResult));
  dlLink.textContent = "Download SQLite file";
  updateLink();
}

// -- routing ----------------------------------------------------------------------------------------------

async function route() {
  if (!session.csrf) {
    try { Object.assign(session, await api("GET", "/ui/session")); } catch (err) { return loginView(); }
  }
  document.getElementById("who").textContent = session.scope === "*" ? "admin: every cluster" : `cluster ${session.scope}`;
  document.getElementById("logout").hidden = false;
  const m = location.hash.match(/^#\/db\/([^/]+)\/([^/]+)$/);
  if (m) return databaseView(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
  return overviewView();
}

document.getElementById("logout").addEventListener("click", async () => {
  try { await api("POST", "/ui/logout"); } catch (err) { /* signed out either way */ }
  session.scope = session.csrf = null;
  loginView("Signed out.");
});
window.addEventListener("hashchange", () => { showError(""); route(); });
route();
