// The console's views. Everything the KBS answers is data: it reaches the page through
// textContent and createElement only, never innerHTML, never an attribute that loads or runs
// anything. Secret values are never fetched, so they cannot be shown.

import * as api from "./api.js";

const $ = (id) => document.getElementById(id);

// An element whose children are elements or text (strings become text nodes).
function el(tag, children = [], className = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function button(label, onClick) {
  const node = el("button", [label]);
  node.type = "button";
  node.addEventListener("click", onClick);
  return node;
}

function rows(tableId, list) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...list.map((cells) => el("tr", cells.map((c) => el("td", [c])))));
}

function say(id, text, kind = "") {
  const node = $(id);
  node.textContent = text;
  node.className = `message ${kind}`;
}

function status(text, kind = "") {
  say("status", text, kind);
}

// Runs a view action; a KBS error, or an endpoint not served yet, is said in the view.
function action(messageId, work) {
  return async () => {
    say(messageId, "…");
    try {
      const done = await work();
      say(messageId, typeof done === "string" ? done : "");
    } catch (error) {
      if (error instanceof api.NotServed) {
        say(messageId, `${error.message}: this view needs a newer Keybroker.`, "unserved");
      } else if (error instanceof api.ApiError) {
        say(messageId, `${error.status} ${error.type}: ${error.message}`, "error");
      } else {
        say(messageId, String(error.message || error), "error");
      }
    }
  };
}

const compact = (value) => (typeof value === "string" ? value : JSON.stringify(value));

// --- login -------------------------------------------------------------------------------

async function logIn() {
  const field = $("token");
  const file = $("token-file").files[0];
  const text = file ? await file.text() : field.value;
  field.value = ""; // the token stays in api.js's memory only, not in the page
  $("token-file").value = "";
  try {
    const claims = api.login(text);
    const minutes = typeof claims.exp === "number" ? Math.round((claims.exp * 1000 - Date.now()) / 60000) : null;
    $("who").textContent = `role ${compact(claims.role ?? "?")}${minutes === null ? "" : `, token expires in ${minutes} min`}`;
    $("login").hidden = true;
    $("tabs").hidden = false;
    $("views").hidden = false;
    $("logout").hidden = false;
    status("");
    show("resources");
  } catch (error) {
    status(String(error.message), "error");
  }
}

function logOut() {
  api.logout();
  window.location.reload(); // drops every value the views hold, too
}

function show(view) {
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== `view-${view}`;
  }
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.classList.toggle("current", tab.dataset.view === view);
  }
}

// --- resources ---------------------------------------------------------------------------

let resourceCursor = null;

async function listResources(more) {
  const prefix = $("res-prefix").value.trim();
  const page = await api.listResources(prefix, more ? resourceCursor : null);
  resourceCursor = page.next;
  $("res-more").hidden = !resourceCursor;
  const hidden = ["name", "path", "current_version", "version", "value", "data"];
  const list = page.items.map((item) => {
    const name = String(item.name ?? item.path ?? "");
    const details = Object.entries(item)
      .filter(([key]) => !hidden.includes(key))
      .map(([key, value]) => `${key}: ${compact(value)}`)
      .join("; ");
    return [name, compact(item.current_version ?? item.version ?? ""), details, resourceActions(name)];
  });
  rows("res-table", list);
  return `${list.length} resource(s) under ${prefix ? `"${prefix}"` : "every repository"}`;
}

function resourceActions(name) {
  return el("span", [
    button("versions", action("res-message", () => showVersions(name))),
    button("delete", action("res-message", async () => {
      await api.deleteResource(name);
      return `${name} deleted`;
    })),
  ]);
}

async function showVersions(name) {
  const meta = await api.resourceMeta(name);
  const versions = Array.isArray(meta.versions) ? meta.versions : [];
  $("res-versions-title").textContent = `Versions of ${name} (current: ${compact(meta.current_version ?? "none")})`;
  $("res-versions").hidden = false;
  const act = (label, verb, number) =>
    button(label, action("res-message", async () => {
      await api.versionAction(name, verb, number);
      await showVersions(name);
      return `${name}: ${verb} of version ${number} done`;
    }));
  rows("res-versions", versions.map((entry) => {
    const number = entry.version;
    const deleted = entry.deleted !== null && entry.deleted !== undefined && entry.deleted !== false;
    return [
      compact(number),
      compact(entry.created ?? ""),
      compact(entry.size ?? ""),
      deleted ? compact(entry.deleted) : "",
      el("span", [
        act("make current", "rollback", number),
        deleted ? act("undelete", "undelete", number) : act("delete", "delete", number),
        act("purge", "purge", number),
      ]),
    ];
  }));
  return `${versions.length} version(s) of ${name}`;
}

async function upload() {
  const path = $("up-path").value.trim();
  const file = $("up-file").files[0];
  const bytes = file ? new Uint8Array(await file.arrayBuffer()) : new TextEncoder().encode($("up-value").value);
  await api.uploadResource(path, bytes);
  $("up-value").value = ""; // the value is gone from the page once sent
  $("up-file").value = "";
  return `uploaded ${path}`;
}

// --- policies ----------------------------------------------------------------------------

async function resourcePolicyIds() {
  const ids = await api.resourcePolicyIds();
  const select = $("rp-id");
  select.replaceChildren(...(Array.isArray(ids) ? ids : []).map((id) => {
    const option = el("option", [String(id)]);
    option.value = String(id);
    return option;
  }));
}

async function loadResourcePolicy() {
  const id = $("rp-id").value || api.GLOBAL_POLICY;
  $("rp-text").value = await api.resourcePolicy(id);
  $("rp-target").value = id;
  return `loaded the installed policy of ${policyName(id)}`;
}

async function saveResourcePolicy() {
  const id = $("rp-target").value.trim() || api.GLOBAL_POLICY;
  await api.setResourcePolicy(id, $("rp-text").value);
  await resourcePolicyIds();
  return `resource policy of ${policyName(id)} installed`;
}

async function deleteResourcePolicy() {
  const id = $("rp-target").value.trim();
  await api.deleteResourcePolicy(id);
  await resourcePolicyIds();
  return `the policy of ${policyName(id)} is deleted: a shorter prefix's, or the global one, applies`;
}

const policyName = (id) => (id === api.GLOBAL_POLICY ? "the global policy" : `prefix ${id}`);

async function listAttestationPolicies() {
  const ids = await api.attestationPolicyIds();
  $("ap-ids").replaceChildren(...(Array.isArray(ids) ? ids : []).map((id) => {
    const item = el("li", [String(id)]);
    item.addEventListener("click", () => { $("ap-id").value = String(id); });
    return item;
  }));
}

async function loadAttestationPolicy() {
  $("ap-text").value = await api.attestationPolicy($("ap-id").value.trim());
  return `loaded ${$("ap-id").value.trim()}`;
}

async function saveAttestationPolicy() {
  const id = $("ap-id").value.trim();
  await api.setAttestationPolicy(id, $("ap-text").value);
  return `attestation policy ${id} installed`;
}

async function deleteAttestationPolicy() {
  const id = $("ap-id").value.trim();
  const answer = await api.deleteAttestationPolicy(id);
  const restored = answer && answer.restored_default === true;
  return `attestation policy ${id} deleted${restored ? ": the shipped default applies again" : ""}`;
}

// --- explain -----------------------------------------------------------------------------

async function runExplain() {
  const kind = $("ex-kind").value;
  const draftEditor = kind === "resource" ? $("rp-text") : $("ap-text");
  const result = await api.explain({
    kind,
    token: $("ex-token").value.trim(),
    path: $("ex-path").value.trim(),
    policyId: $("ex-policy-id").value.trim(),
    draft: $("ex-draft").checked ? draftEditor.value : null,
  });
  const decision = result.decision;
  const node = $("ex-decision");
  if (decision === null || decision === undefined) {
    node.textContent = "NO DECISION: the policy failed to evaluate";
    node.className = "decision deny";
  } else if (typeof decision.allow === "boolean") {
    node.textContent = decision.allow ? "ALLOWED: the resource would be released" : "DENIED: the resource policy refuses this token";
    node.className = `decision ${decision.allow ? "allow" : "deny"}`;
  } else {
    node.textContent = `status ${compact(decision.status)}; trust claims ${compact(decision.trust_claims)}`;
    node.className = `decision ${decision.status === "affirming" ? "allow" : "deny"}`;
  }
  $("ex-policy").textContent = result.policy_id ? `decided by: ${compact(result.policy_id)}` : "";
  rows("ex-rules", Object.entries(result.rules || {}).map(([name, value]) => [name, compact(value)]));
  $("ex-input").textContent = JSON.stringify(result.input, null, 2);
  return result.error ? `the policy failed: ${result.error}` : "";
}

function explainDraft() {
  $("ex-kind").value = "resource";
  $("ex-draft").checked = true;
  show("explain");
}

// --- reference values --------------------------------------------------------------------

async function listReferenceValues() {
  const listed = await api.referenceValues();
  const ids = Array.isArray(listed) ? listed : Object.keys(listed || {});
  $("rv-ids").replaceChildren(...ids.map((id) => {
    const name = typeof id === "object" && id !== null ? String(id.id ?? id.name ?? "") : String(id);
    const item = el("li", [name]);
    item.addEventListener("click", () => { $("rv-id").value = name; });
    return item;
  }));
  return `${ids.length} reference value(s)`;
}

async function showReferenceValue() {
  const value = await api.referenceValue($("rv-id").value.trim());
  $("rv-value").textContent = JSON.stringify(value, null, 2);
}

async function deleteReferenceValue() {
  const id = $("rv-id").value.trim();
  await api.deleteReferenceValue(id);
  return `reference value ${id} deleted`;
}

async function registerReferenceValue() {
  const name = $("rv-name").value.trim();
  let value;
  try {
    value = JSON.parse($("rv-new").value);
  } catch {
    throw new Error("the value must be JSON, e.g. [\"1.2.3\"]");
  }
  await api.registerSampleReferenceValue(name, value);
  return `reference value ${name} registered`;
}

// --- audit log ---------------------------------------------------------------------------

let auditCursor = null;

async function showAudit(older) {
  const query = {
    action: $("au-action").value.trim(),
    decision: $("au-decision").value,
    target: $("au-target").value.trim(),
    since: $("au-since").value.trim(),
    limit: $("au-limit").value,
    cursor: older ? auditCursor : null,
    verify: "file",
  };
  const page = await api.auditLog(query);
  auditCursor = page.next_cursor;
  $("au-more").hidden = !auditCursor;
  const chain = page.chain || {};
  const badge = $("au-chain");
  badge.textContent = `Chain ${chain.summary}`;
  badge.className = `chain ${chain.status}`;
  badge.dataset.status = String(chain.status);
  rows("au-table", page.records.map((record) => [
    compact(record.seq),
    compact(record.time),
    compact(record.action),
    compact(record.target),
    compact(record.decision),
    subjectText(record.subject),
    compact(record.reason ?? record.checkpoint ?? ""),
    compact(record.peer ?? ""),
  ]));
  return `${page.records.length} record(s), newest first; read ${page.scan.bytes} bytes${page.scan.reached_start ? " (back to the start of the log)" : ""}`;
}

function subjectText(subject) {
  if (!subject || typeof subject !== "object") return "";
  if (subject.kind === "admin") return `admin ${compact(subject.role)}${subject.issuer ? ` (${compact(subject.issuer)})` : ""}`;
  return `guest ${compact(subject.tee ?? "")} token ${compact(subject.token_id ?? "").slice(0, 12)}`;
}

// --- attestations ------------------------------------------------------------------------

async function showAttestations() {
  const page = await api.attestations({ limit: $("at-limit").value });
  rows("at-counts", page.by_tee.map((row) => [compact(row.tee), compact(row.status), compact(row.count)]));
  rows("at-table", page.attestations.map((row) => [
    compact(row.time),
    compact(row.tee),
    compact(row.status),
    compact(row.token_id ?? "").slice(0, 12),
    compact(row.peer ?? ""),
    compact(row.reason ?? ""),
  ]));
  return `${page.attestations.length} attestation(s)`;
}

// --- wiring ------------------------------------------------------------------------------

function wire() {
  $("login-button").addEventListener("click", logIn);
  $("logout").addEventListener("click", logOut);
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  const on = (id, handler) => $(id).addEventListener("click", handler);
  on("res-list", action("res-message", () => listResources(false)));
  on("res-more", action("res-message", () => listResources(true)));
  on("up-button", action("up-message", upload));
  on("rp-load", action("rp-message", loadResourcePolicy));
  on("rp-save", action("rp-message", saveResourcePolicy));
  on("rp-delete", action("rp-message", deleteResourcePolicy));
  on("rp-explain", explainDraft);
  on("ap-list", action("ap-message", listAttestationPolicies));
  on("ap-load", action("ap-message", loadAttestationPolicy));
  on("ap-save", action("ap-message", saveAttestationPolicy));
  on("ap-delete", action("ap-message", deleteAttestationPolicy));
  on("ex-run", action("ex-error", runExplain));
  on("rv-list", action("rv-message", listReferenceValues));
  on("rv-get", action("rv-message", showReferenceValue));
  on("rv-delete", action("rv-message", deleteReferenceValue));
  on("rv-register", action("rv-message", registerReferenceValue));
  on("au-show", action("au-message", () => showAudit(false)));
  on("au-more", action("au-message", () => showAudit(true)));
  on("at-show", action("at-message", showAttestations));
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.addEventListener("click", () => {
      if (tab.dataset.view === "policies") action("rp-message", resourcePolicyIds)();
    });
  }
}

wire();
