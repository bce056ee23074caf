// The API as the console uses it: the stored key on every call, problem+json turned into
// words. Every page goes through here; none calls fetch itself.

const KEY_STORE = "voicefoundry.apiKey";

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORE) || "";
  } catch {
    return "";
  }
}

export function setKey(value) {
  const key = (value || "").trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

/** An API answer that was not a success, with the server's problem+json fields. */
export class ApiError extends Error {
  constructor(status, problem, fallback) {
    const detail = problem?.detail || problem?.title || fallback || `HTTP ${status}`;
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.problem = problem || {};
  }

  /** What to tell the person: the server's reason, plus what to do about a missing key. */
  get words() {
    if (this.status === 401) {
      return getKey()
        ? `The API key was refused: ${this.message}`
        : `This needs an API key: enter one at the top of the page. (${this.message})`;
    }
    if (this.status === 403) return `This key may not do that: ${this.message}`;
    const extra = this.problem.errors || this.problem.problems;
    const lines = Array.isArray(extra)
      ? extra.map((e) => (typeof e === "string" ? e : e.message || JSON.stringify(e)))
      : [];
    const retry = this.problem.retry_after ? ` Try again in ${this.problem.retry_after} s.` : "";
    return [this.message + retry, ...lines].join("\n");
  }
}

export function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function problemOf(response) {
  const text = await response.text().catch(() => "");
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text.trim().slice(0, 400) || response.statusText };
  }
}

/** fetch with the key; throws ApiError on a non-2xx answer (its body read as problem+json). */
export async function request(method, path, { json, form, signal, headers } = {}) {
  const init = { method, signal, headers: authHeaders(headers) };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form !== undefined) {
    init.body = form; // multipart: the browser sets the boundary
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, null, `The server could not be reached (${err.message}).`);
  }
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  return response;
}

export async function getJSON(path, options = {}) {
  return (await request("GET", path, options)).json();
}

export async function sendJSON(method, path, body, options = {}) {
  const response = await request(method, path, { ...options, json: body });
  return response.status === 204 ? null : response.json();
}

/** Server-sent events read with fetch (EventSource cannot send the key header): calls
 *  onEvent(parsed JSON) for each `data:` event until the stream ends or signal aborts. */
export async function readEvents(path, onEvent, { signal } = {}) {
  const response = await request("GET", path, {
    signal,
    headers: { Accept: "text/event-stream" },
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

/** A WebSocket URL on this server; the key goes as `api_key` (browsers cannot set headers). */
export function socketURL(path, params = {}) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const key = getKey();
  if (key) url.searchParams.set("api_key", key);
  return url.toString();
}

/** Words for any error a page meets. */
export function describe(err) {
  if (err instanceof ApiError) return err.words;
  if (err?.name === "NotAllowedError") return "The browser refused the microphone or audio.";
  return err?.message || String(err);
}
