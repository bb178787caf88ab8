"use strict";
// bimode serve's chat page. It is an ordinary client of the server's own OpenAI endpoint: POST
// /v1/chat/completions with stream: true, read as server-sent events. What it shows comes from the OpenAI shape:
// delta.reasoning_content (the reasoning), delta.content (the answer), usage (token counts, reasoning_tokens), and
// each choice's last chunk's `bimode` field (the mode the answer took and auto mode's p_think).
// Model output and the server's messages are written with textContent only, never as HTML.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "bimode.apiKey"; // this tab only: sessionStorage is gone when the tab closes
const state = { history: [], image: null, controller: null };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// The server's words for a refused request: its message, the field at fault (400) and Retry-After (429, 503).
async function describeFailure(response) {
  const raw = await response.text();
  let message = raw.trim().slice(0, 2000) || response.statusText;
  let param = null;
  try {
    const body = JSON.parse(raw);
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
      param = body.error.param;
    } else if (body && body.detail !== undefined) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch (_) { /* not JSON: the text as it came */ }
  let out = `HTTP ${response.status}: ${message}`;
  if (param) out += ` (field: ${param})`;
  const retry = response.headers.get("Retry-After");
  if (retry) out += ` (Retry-After: ${retry}${/^\d+$/.test(retry) ? " s" : ""})`;
  return out;
}

// Server-sent events: the `data:` payload of each event, as the bytes arrive.
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const take = function* (final) {
    const events = buffer.split("\n\n");
    buffer = final ? "" : events.pop();
    for (const event of events) {
      const data = event.split("\n").map((line) => line.replace(/\r$/, ""))
        .filter((line) => line.startsWith("data:")).map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    yield* take(false);
  }
  buffer += decoder.decode();
  yield* take(true);
}

// ---- the conversation on screen ----

function addUserTurn(text, image) {
  const turn = el("section", "turn user");
  if (image) {
    const img = el("img");
    img.src = image; // the user's own upload, a data: URL
    img.alt = "your image";
    turn.append(img);
  }
  turn.append(el("p", "text", text));
  $("conversation").append(turn);
  return turn;
}

// An assistant turn: its meta line, a collapsible reasoning block (shown once reasoning arrives) and the answer.
function addAssistantTurn(mode) {
  const turn = el("section", "turn assistant");
  const meta = el("div", "meta");
  const requested = el("span", "requested", mode === "auto" ? "auto" : `forced ${mode}`);
  const decision = el("span", "decision");
  const pThink = el("span", "p-think");
  const tokens = el("span", "tokens");
  const status = el("span", "status", "waiting…");
  meta.append(requested, decision, pThink, tokens, status);
  const details = el("details", "reasoning");
  details.open = true;
  details.hidden = true;
  const summary = el("summary", "", "Reasoning");
  const reasoningText = document.createTextNode("");
  const pre = el("pre", "reasoning-text");
  pre.append(reasoningText);
  details.append(summary, pre);
  const answerText = document.createTextNode("");
  const answer = el("div", "answer");
  answer.append(answerText);
  turn.append(meta, details, answer);
  $("conversation").append(turn);
  return { turn, decision, pThink, tokens, status, details, summary, reasoningText, answerText, mode,
           reasoning: "", content: "" };
}

function addReasoning(view, text) {
  view.reasoning += text;
  view.reasoningText.appendData(text);
  view.details.hidden = false;
}

function addContent(view, text) {
  view.content += text;
  view.answerText.appendData(text);
}

function showDecision(view, decision) {
  const taken = decision.mode;
  const words = { think: "thought", no_think: "answered directly", malformed: "never closed its thinking" };
  const said = view.mode === "auto" ? { think: "decided to think", no_think: "decided not to think" } : {};
  view.decision.textContent = said[taken] || words[taken] || String(taken);
  view.decision.className = `decision ${taken}`;
  view.decision.dataset.mode = taken;
  if (typeof decision.p_think === "number") {
    view.pThink.textContent = `p_think ${decision.p_think.toFixed(3)}`;
    view.pThink.dataset.value = String(decision.p_think);
  }
  if (decision.budget_hit) view.decision.textContent += " (thinking budget reached)";
}

function showUsage(view, usage) {
  const thinking = (usage.completion_tokens_details || {}).reasoning_tokens || 0;
  const answer = usage.completion_tokens - thinking;
  view.tokens.textContent = `${thinking} thinking tokens, ${answer} answer tokens`;
  view.tokens.dataset.thinking = String(thinking);
  view.tokens.dataset.answer = String(answer);
  view.summary.textContent = `Reasoning (${thinking} tokens)`;
}

function fail(view, message) {
  view.turn.classList.add("failed");
  view.status.textContent = "failed: not kept in the conversation";
  view.turn.append(el("p", "turn-error", message));
  showError(message);
}

// ---- a request ----

function requestBody(userMessage) {
  const body = {
    messages: [...state.history, userMessage],
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { thinking_mode: $("mode").value },
  };
  // sent as typed: a bad value is the server's to refuse, with its own words and the field's name
  const budget = $("budget").value.trim();
  if (budget !== "") body.max_thinking_tokens = Number(budget);
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

async function send() {
  const text = $("prompt").value;
  const image = state.image;
  if (!text.trim() && !image) return;
  showError("");
  const userMessage = { role: "user",
    content: image ? [{ type: "image_url", image_url: { url: image } }, { type: "text", text }] : text };
  const body = requestBody(userMessage);
  const userTurn = addUserTurn(text, image);
  const view = addAssistantTurn($("mode").value);
  $("prompt").value = "";
  setImage(null);
  setBusy(true);
  const ok = await stream(body, view);
  setBusy(false);
  if (ok) {
    state.history.push(userMessage, { role: "assistant", content: view.content,
      reasoning_content: view.reasoning || null });
  } else { // the composer gets the message back, to change and send again
    userTurn.classList.add("failed");
    $("prompt").value = text;
    setImage(image);
  }
  $("conversation").scrollTop = $("conversation").scrollHeight;
}

// Streams one answer into `view`; true when it ended well (then it joins the conversation).
async function stream(body, view) {
  state.controller = new AbortController();
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body), signal: state.controller.signal });
  } catch (err) {
    fail(view, err.name === "AbortError" ? "stopped" : `the server could not be reached: ${err.message}`);
    return false;
  }
  if (!response.ok) {
    fail(view, await describeFailure(response));
    return false;
  }
  view.status.textContent = "streaming…";
  let finish = null;
  try {
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) { // the server ended the stream with an error event
        fail(view, `HTTP ${chunk.error.code}: ${chunk.error.message}`);
        return false;
      }
      if (chunk.usage) showUsage(view, chunk.usage);
      const choice = (chunk.choices || []).find((c) => c.index === 0);
      if (!choice) continue;
      const delta = choice.delta || {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (reasoning) addReasoning(view, reasoning);
      if (delta.content) addContent(view, delta.content);
      if (choice.bimode) showDecision(view, choice.bimode);
      if (choice.finish_reason) finish = choice.finish_reason;
      $("conversation").scrollTop = $("conversation").scrollHeight;
    }
  } catch (err) {
    fail(view, err.name === "AbortError" ? "stopped" : `the stream broke off: ${err.message}`);
    return false;
  }
  if (finish === null) {
    fail(view, "the stream ended without a finish_reason");
    return false;
  }
  view.status.textContent = finish === "length" ? "cut off at max tokens" : "";
  view.turn.classList.add("done");
  return true;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  if (!busy) state.controller = null;
}

// ---- the image ----

function setImage(dataUrl) {
  state.image = dataUrl;
  $("image-preview").hidden = !dataUrl;
  $("image-remove").hidden = !dataUrl;
  $("drop-hint").hidden = Boolean(dataUrl);
  if (dataUrl) $("image-preview").src = dataUrl;
  else $("image-preview").removeAttribute("src");
}

function readImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name || "that file"} is not an image (${file.type || "unknown type"})`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.onerror = () => showError(`could not read ${file.name}`);
  reader.readAsDataURL(file);
}

// ---- the server's model and the key ----

let modelAsks = 0; // only the latest ask writes: an earlier one (say, without the key) may answer last

async function loadModel() {
  const ask = ++modelAsks;
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (ask !== modelAsks) return;
    if (!response.ok) {
      $("model").textContent = response.status === 401 ? "(enter the API key)" : "";
      return;
    }
    const models = (await response.json()).data || [];
    if (ask === modelAsks) $("model").textContent = models.length ? models[0].id : "";
  } catch (_) {
    if (ask === modelAsks) $("model").textContent = "";
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModel();
  });
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!$("send").disabled) send();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("conversation").replaceChildren();
    showError("");
  });
  $("image-input").addEventListener("change", (event) => { readImage(event.target.files[0]); event.target.value = ""; });
  $("image-remove").addEventListener("click", () => setImage(null));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    readImage(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData || {}).files || []].find((f) => f.type.startsWith("image/"));
    if (file) { event.preventDefault(); readImage(file); }
  });
  loadModel();
}

init();
