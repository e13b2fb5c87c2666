// Choosing a model for a source row: "Find…" opens a dialog with the data folders (GET /v1/sources/local, a
// server-side listing confined to the data dirs) and Hub search (GET /v1/sources/hub, with the Hub token of the
// Tokens panel). Each checkpoint shows its architecture, parameter count and size before it is picked; "Use"
// puts it into the row.
"use strict";

const picker = { row: null, path: null };

function fmtCount(n) {
  if (!Number.isFinite(n)) return "";
  const units = ["", "K", "M", "B", "T"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(1) : n}${units[i]}`;
}

/** "LlamaForCausalLM · 1.2M parameters · 2.4 MB · BF16" for a checkpoint's facts. */
function factsText(m) {
  if (!m) return "";
  const bits = [m.architecture || m.model_type || (m.kind === "adapter" ? "adapter" : "")];
  if (m.kind === "adapter" && m.base_model) bits.push(`adapter of ${m.base_model}`);
  if (Number.isFinite(m.parameters)) bits.push(`${fmtCount(m.parameters)} parameters`);
  if (Number.isFinite(m.bytes)) bits.push(fmtBytes(m.bytes));
  if (m.dtypes?.length) bits.push(m.dtypes.join(", "));
  if (m.problem) bits.push(m.problem);
  return bits.filter(Boolean).join(" · ");
}

function openPicker(row) {
  picker.row = row;
  const dialog = $("#source-picker");
  const kind = $(".src-kind", row).value;
  if (!dialog.open) dialog.showModal();
  showTab(kind === "hub" ? "hub" : "local");
  if (kind === "hub") {
    $("#picker-search").value = $(".src-id", row).value.trim();
    $("#picker-search").focus();
  } else browse(null);
}

function showTab(which) {
  for (const tab of ["local", "hub"]) {
    $(`#picker-${tab}`).hidden = tab !== which;
    $(`#picker-tab-${tab}`).setAttribute("aria-selected", String(tab === which));
  }
}

function useSource(kind, id) {
  const row = picker.row;
  $("#source-picker").close();
  if (!row) return;
  const kindInput = $(".src-kind", row), idInput = $(".src-id", row);
  kindInput.value = kind;
  kindInput.dispatchEvent(new Event("change", { bubbles: true }));
  idInput.value = id;
  idInput.dispatchEvent(new Event("input", { bubbles: true }));
  idInput.focus();
}

function item(label, facts, actions) {
  const li = document.createElement("li");
  const text = document.createElement("div");
  text.className = "picker-text";
  const name = document.createElement("span");
  name.className = "picker-name";
  name.textContent = label;
  text.append(name);
  if (facts) {
    const f = document.createElement("span");
    f.className = "picker-facts";
    f.textContent = facts;
    text.append(f);
  }
  const buttons = document.createElement("div");
  buttons.className = "picker-actions";
  for (const [caption, aria, onClick, cls] of actions) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = `small ${cls || "secondary"}`;
    b.textContent = caption;
    b.setAttribute("aria-label", aria);
    b.addEventListener("click", onClick);
    buttons.append(b);
  }
  li.append(text, buttons);
  return li;
}

async function browse(path) {
  const error = $("#picker-local-error");
  error.hidden = true;
  const res = await api("GET", `/v1/sources/local${path ? `?path=${encodeURIComponent(path)}` : ""}`);
  if (!res.ok) {
    if (handleAuth(res)) return;
    error.textContent = problemText(res.data);
    error.hidden = false;
    return;
  }
  const listing = res.data;
  picker.path = listing.path;
  $("#picker-path").textContent = listing.path ? `In ${listing.path}` : "The server's data folders";
  const items = [];
  if (listing.path) {
    const up = listing.parent;
    items.push(item("..", "", [["Up", "Up one folder", () => browse(up)]]));
  }
  if (listing.model) {
    items.push(item("this folder", factsText(listing.model), [["Use", `Use ${listing.path}`, () => useSource("local", listing.path), "primary"]]));
  }
  for (const entry of listing.entries) {
    const actions = [["Open", `Open ${entry.name}`, () => browse(entry.path)]];
    if (entry.model) actions.push(["Use", `Use ${entry.name}`, () => useSource("local", entry.path), "primary"]);
    items.push(item(entry.name, factsText(entry.model), actions));
  }
  if (listing.truncated) items.push(item("…", "more folders than a listing shows (the first 500 by name)", []));
  if (!listing.entries.length && !listing.model) items.push(item("(no folders here)", "", []));
  $("#picker-entries").replaceChildren(...items);
  ($("#picker-entries button.primary") || $("#picker-entries button") || $("#picker-close")).focus();
}

async function searchHub() {
  const query = $("#picker-search").value.trim().replace(/^hf:\/\//, "").replace(/@.*$/, "");
  const error = $("#picker-hub-error"), status = $("#picker-hub-status");
  error.hidden = true;
  if (query.length < 2) { error.textContent = "Type at least two characters of a repo id."; error.hidden = false; return; }
  status.textContent = `Searching the Hub for “${query}”…`;
  const res = await api("GET", `/v1/sources/hub?search=${encodeURIComponent(query)}`, { hubToken: true });
  status.textContent = "";
  if (!res.ok) {
    if (handleAuth(res)) return;
    error.textContent = problemText(res.data);
    error.hidden = false;
    $("#picker-results").replaceChildren();
    return;
  }
  const items = res.data.items.map((m) => item(m.repo, m.problem || factsText(m.model),
    m.problem ? [] : [["Use", `Use ${m.repo}`, () => useSource("hub", m.repo), "primary"]]));
  status.textContent = items.length ? `${items.length} found` : `No repo id contains “${query}”.`;
  $("#picker-results").replaceChildren(...items);
  $("#picker-results button.primary")?.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  document.addEventListener("click", (event) => {
    const find = event.target.closest?.(".model-row .find");
    if (find) openPicker(find.closest(".model-row"));
  });
  $("#picker-close").addEventListener("click", () => $("#source-picker").close());
  $("#picker-tab-local").addEventListener("click", () => { showTab("local"); browse(picker.path); });
  $("#picker-tab-hub").addEventListener("click", () => { showTab("hub"); $("#picker-search").focus(); });
  $("#picker-search-go").addEventListener("click", searchHub);
  $("#picker-search").addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); searchHub(); }
  });
  $("#source-picker").addEventListener("close", () => picker.row && $(".src-id", picker.row)?.focus());
});
