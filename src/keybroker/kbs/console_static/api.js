// The console's only link to the KBS: the admin API, exactly as kbs-client uses it.
//
// Every call carries the admin JWT in "Authorization: Bearer"; the token lives in this
// module's memory only (never localStorage, sessionStorage or a cookie), and the page sends no
// cookies with its calls (credentials: "omit"), so a forged cross-site request has nothing to
// ride on. Each endpoint's path is named once in PATHS: adapting to a renamed endpoint is a
// one-line change here.

// /kbs/v0/, worked out from this page's own address (also behind a proxy that adds a prefix)
const BASE = new URL("../", document.baseURI);

export const PATHS = {
  // Resource listing and versions (the i22-versions branch, not served yet):
  resources: "resources", // GET ?prefix&limit&cursor: names, current versions, times
  resourceMeta: (path) => `resource-meta/${segments(path)}`, // GET: every version, never a value
  // POST {"version": N}: rollback, delete (soft), undelete, purge
  versionAction: (path, action) => `resource-meta/${segments(path)}/${encodeURIComponent(action)}`,
  resource: (path) => `resource/${segments(path)}`, // POST uploads, DELETE deletes (upstream's)
  resourcePolicies: "resource-policy", // GET lists ids, POST installs the global policy
  // GET reads one back (the global "resource-policy", or a tenant prefix repo[/type]);
  // POST installs, DELETE removes a tenant prefix's policy
  resourcePolicy: (id) => `resource-policy/${segments(id)}`,
  attestationPolicies: "attestation-policy", // GET lists ids, POST installs
  attestationPolicy: (id) => `attestation-policy/${encodeURIComponent(id)}`, // GET, DELETE
  referenceValues: "reference-value", // GET lists names, POST registers
  referenceValue: (id) => `reference-value/${segments(id)}`, // GET, DELETE
  explain: "policy-explain", // POST
  auditLog: "audit-log", // GET ?action&decision&target&since&limit&cursor&verify
  attestations: "audit-log/attestations", // GET ?limit&since&cursor
};

let token = null;

export function login(text) {
  const candidate = String(text).trim();
  if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(candidate)) {
    throw new Error("that is not a JWT (three base64url parts separated by dots)");
  }
  token = candidate;
  return claims(candidate);
}

export function logout() {
  token = null;
}

export function loggedIn() {
  return token !== null;
}

// The token's claims, for display only: the KBS verifies the token on every call.
function claims(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const parsed = JSON.parse(new TextDecoder().decode(fromBase64(part)));
    return parsed !== null && typeof parsed === "object" ? parsed : {};
  } catch {
    return {};
  }
}

// An error answer of the KBS: its status, problem type and detail.
export class ApiError extends Error {
  constructor(status, type, detail) {
    super(detail);
    this.status = status;
    this.type = type;
  }
}

// The endpoint is not served by this KBS (yet): the branch that adds it has not landed.
export class NotServed extends Error {
  constructor(what) {
    super(`${what} is not served by this KBS yet`);
  }
}

async function call(method, path, { query, json, bytes } = {}) {
  const url = new URL(path, BASE);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = {};
  if (token !== null) headers.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (bytes !== undefined) {
    headers["Content-Type"] = "application/octet-stream";
    body = bytes;
  }
  const response = await fetch(url, {
    method,
    headers,
    body,
    credentials: "omit",
    cache: "no-store",
    redirect: "error",
    referrerPolicy: "no-referrer",
  });
  if (!response.ok) {
    let problem = {};
    try {
      problem = await response.json();
    } catch {
      problem = {};
    }
    const type = String(problem.type || "").split("/").pop();
    throw new ApiError(response.status, type, String(problem.detail || `HTTP ${response.status}`));
  }
  const text = await response.text();
  if (!text) return null;
  return (response.headers.get("content-type") || "").includes("json") ? JSON.parse(text) : text;
}

// Calls an endpoint an older KBS may lack: "no such endpoint" (404 PluginNotFound, the
// dispatcher's answer for an unknown name) or "no such method" (405 MethodNotAllowed) mean
// not served. A deployment that cannot offer one (405 UnsupportedOperation, e.g. policies
// held by a remote attestation service) says why in its own words.
async function optional(what, method, path, options) {
  try {
    return await call(method, path, options);
  } catch (error) {
    const missing =
      error instanceof ApiError &&
      ((error.status === 404 && error.type === "PluginNotFound") ||
        (error.status === 405 && error.type === "MethodNotAllowed"));
    if (missing) throw new NotServed(what);
    throw error;
  }
}

function segments(path) {
  return String(path).split("/").map(encodeURIComponent).join("/");
}

export function toBase64url(bytes) {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function fromBase64(text) {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/");
  const binary = atob(padded + "===".slice((padded.length + 3) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

const utf8 = (text) => new TextEncoder().encode(text);

// --- resources ---------------------------------------------------------------------------

export async function listResources(prefix, cursor) {
  const query = { prefix, limit: 100, cursor };
  const answer = await optional("Resource listing (GET /kbs/v0/resources)", "GET", PATHS.resources, { query });
  return { items: answer.resources, next: answer.next_cursor };
}

export const resourceMeta = (path) =>
  optional("Resource versions (GET /kbs/v0/resource-meta/<path>)", "GET", PATHS.resourceMeta(path));

export const uploadResource = (path, bytes) => call("POST", PATHS.resource(path), { bytes });

export const deleteResource = (path) => call("DELETE", PATHS.resource(path));

// rollback (makes ``version`` current again), delete (soft), undelete or purge one version
export const versionAction = (path, action, version) =>
  optional(`Resource versions (${action})`, "POST", PATHS.versionAction(path, action), {
    json: { version: Number(version) },
  });

// --- policies ----------------------------------------------------------------------------

export const resourcePolicyIds = () => call("GET", PATHS.resourcePolicies);

export async function resourcePolicy(id) {
  const what = "Reading a resource policy back (GET /kbs/v0/resource-policy/<id>)";
  return policyText(what, await optional(what, "GET", PATHS.resourcePolicy(id)));
}

export const GLOBAL_POLICY = "resource-policy";

// The global policy, or a tenant prefix's (repo or repo/type) when ``id`` names one.
export function setResourcePolicy(id, rego) {
  const path = id === GLOBAL_POLICY ? PATHS.resourcePolicies : PATHS.resourcePolicy(id);
  return call("POST", path, { json: { policy: toBase64url(utf8(rego)) } });
}

export const deleteResourcePolicy = (id) =>
  optional("Deleting a tenant policy", "DELETE", PATHS.resourcePolicy(id));

export const attestationPolicyIds = () =>
  optional("Listing attestation policies (GET /kbs/v0/attestation-policy)", "GET", PATHS.attestationPolicies);

export async function attestationPolicy(id) {
  const what = "Reading an attestation policy back (GET /kbs/v0/attestation-policy/<id>)";
  return policyText(what, await optional(what, "GET", PATHS.attestationPolicy(id)));
}

export const setAttestationPolicy = (id, rego) =>
  call("POST", PATHS.attestationPolicies, {
    json: { type: "rego", policy_id: id, policy: toBase64url(utf8(rego)) },
  });

export const deleteAttestationPolicy = (id) =>
  optional("Deleting an attestation policy", "DELETE", PATHS.attestationPolicy(id));

// A policy read back: {"policy": "<base64url>"} (as posted) or the text itself. Anything else
// (the upstream list of ids that GET /resource-policy/<id> answers before read-back exists)
// means read-back is not served.
function policyText(what, answer) {
  if (typeof answer === "string") return answer;
  if (answer && typeof answer.policy === "string") {
    return new TextDecoder().decode(fromBase64(answer.policy));
  }
  throw new NotServed(what);
}

// --- explain -----------------------------------------------------------------------------

export function explain({ kind, token: guestToken, path, policyId, draft }) {
  const request = { kind, token: guestToken };
  if (kind === "resource") {
    const resourcePath = path ? String(path).split("/") : [];
    request.data = { plugin: "resource", "resource-path": resourcePath, query: {} };
  } else {
    request.policy_id = policyId || "default_cpu";
  }
  if (draft) request.policy = toBase64url(utf8(draft));
  return call("POST", PATHS.explain, { json: request });
}

// --- reference values --------------------------------------------------------------------

export const referenceValues = () =>
  optional("Listing reference values (GET /kbs/v0/reference-value)", "GET", PATHS.referenceValues);

export const referenceValue = (id) => call("GET", PATHS.referenceValue(id));

export const deleteReferenceValue = (id) =>
  optional("Deleting a reference value", "DELETE", PATHS.referenceValue(id));

export function registerSampleReferenceValue(name, value) {
  const payload = btoa(String.fromCharCode(...utf8(JSON.stringify({ [name]: value }))));
  return call("POST", PATHS.referenceValues, { json: { version: "0.1.0", type: "sample", payload } });
}

// --- audit log ---------------------------------------------------------------------------

export const auditLog = (query) => call("GET", PATHS.auditLog, { query });

export const attestations = (query) => call("GET", PATHS.attestations, { query });
