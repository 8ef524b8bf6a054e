// The playground page: streams one request with `diffusing: true` and draws every canvas, and
// polls /health once a second for the cluster panel. Plain browser JavaScript, no libraries.
// Model output only ever reaches the page through textContent (never as HTML).
"use strict";

const MASK = "\u2591"; // engine.types.MASK_GLYPH: one per still-masked token
const KEY_STORE = "dllm-playground-key";
const HISTORY = 120; // health samples kept for the sparkline: 2 minutes at one a second
const $ = (id) => document.getElementById(id);
// the API sits beside the page: /playground -> "", /prefix/playground -> "/prefix"
const BASE = location.pathname.replace(/\/playground\/?$/, "");

let controller = null; // AbortController of the request in flight
let frames = []; // canvases waiting to be drawn at the chosen pace
let playing = null; // the playback timer
let lastCanvas = "";
let context = { before: "", shown: null }; // the prompt drawn before the canvas
const history = { steps: [], drain: [] };

// --- API ---------------------------------------------------------------------------------------
function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function apiError(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || message;
  } catch (_) { /* not JSON: keep the status text */ }
  if (response.status === 401) message += " \u2014 enter the API key at the top right";
  return new Error(response.status + ": " + message);
}

async function api(path, options = {}) {
  const headers = Object.assign({ "Content-Type": "application/json" }, authHeaders());
  const response = await fetch(BASE + path, Object.assign({ headers }, options));
  if (!response.ok) throw await apiError(response);
  return response;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// --- models ------------------------------------------------------------------------------------
async function loadModels() {
  const select = $("model");
  try {
    const list = await (await api("/v1/models")).json();
    select.replaceChildren(...list.data.map((card) => {
      const option = document.createElement("option");
      option.value = option.textContent = card.id;
      option.card = card;
      return option;
    }));
    showCard();
    showError("");
  } catch (e) {
    select.replaceChildren();
    $("card").textContent = "";
    showError(e.message);
  }
}

function showCard() {
  const option = $("model").selectedOptions[0];
  if (!option) return;
  const card = option.card;
  $("block-length").placeholder = card.block_length || "whole answer";
  $("card").textContent = `${card.id}: ${card.max_model_len} tokens of context, ` +
    `blocks of ${card.block_length || "the whole answer"}, ` +
    `${card.default_denoising_steps} steps per block by default`;
}

// --- canvases ----------------------------------------------------------------------------------
// Which characters of `next` are new since `prev`: committed tokens never change, so `next` is
// `prev` with some mask glyphs replaced by text, and the characters a longest common
// subsequence leaves unmatched are the text committed this step. Only the active block differs,
// so the common prefix and suffix are cut first and the quadratic part stays ~one block wide.
function freshChars(prev, next) {
  const fresh = new Array(next.length).fill(false);
  let lo = 0;
  while (lo < prev.length && lo < next.length && prev[lo] === next[lo]) lo++;
  let a = prev.length, b = next.length;
  while (a > lo && b > lo && prev[a - 1] === next[b - 1]) { a--; b--; }
  const p = prev.slice(lo, a), n = next.slice(lo, b);
  // lcs[i][j]: longest common subsequence of p[i:] and n[j:]
  const lcs = Array.from({ length: p.length + 1 }, () => new Uint16Array(n.length + 1));
  for (let i = p.length - 1; i >= 0; i--) {
    for (let j = n.length - 1; j >= 0; j--) {
      lcs[i][j] = p[i] === n[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  let i = 0, j = 0;
  while (j < n.length) {
    if (i < p.length && p[i] === n[j]) { i++; j++; }
    else if (i < p.length && lcs[i + 1][j] >= lcs[i][j + 1]) i++;
    else { fresh[lo + j] = n[j] !== MASK; j++; }
  }
  return fresh;
}

// Runs of masked / new / earlier characters as spans (text nodes: never parsed as HTML).
function drawCanvas(canvas, fresh) {
  const spans = [];
  let start = 0;
  const kind = (k) => (canvas[k] === MASK ? "mask" : fresh[k] ? "fresh" : "");
  for (let k = 1; k <= canvas.length; k++) {
    if (k < canvas.length && kind(k) === kind(start)) continue;
    const span = document.createElement("span");
    span.className = kind(start);
    span.textContent = canvas.slice(start, k);
    spans.push(span);
    start = k;
  }
  $("gen").replaceChildren(...spans);
}

// Token healing regenerates the prompt's trailing whitespace token as the answer's first one:
// the text deltas leave it out (the prompt has it), the canvases still hold it. While the
// canvases show, the prompt is drawn without the whitespace the first canvas starts with.
function healedOverlap(prompt, canvas) {
  const space = prompt.match(/\s*$/)[0];
  for (let k = space.length; k > 0; k--) {
    if (canvas.startsWith(space.slice(space.length - k))) return k;
  }
  return 0;
}

function showFrame(frame) {
  if (frame.canvas !== undefined) {
    if (context.shown === null) {
      const cut = healedOverlap(context.before, frame.canvas);
      context.shown = context.before.slice(0, context.before.length - cut);
      $("before").textContent = context.shown;
    }
    drawCanvas(frame.canvas, freshChars(lastCanvas, frame.canvas));
    lastCanvas = frame.canvas;
    $("phase").textContent = `denoising \u00b7 step ${frame.step}`;
  } else {
    frame.done();
  }
}

// Canvases are drawn one per `pace` ms (0: as they arrive): a CPU replica can finish a whole
// answer in a third of a second, too fast to watch.
function enqueue(frame) {
  frames.push(frame);
  if (!playing) play();
}

function play() {
  const frame = frames.shift();
  if (!frame) { playing = null; return; }
  showFrame(frame);
  playing = setTimeout(play, Number($("pace").value));
}

function stopPlayback() {
  clearTimeout(playing);
  playing = null;
  frames = [];
}

// --- a request ---------------------------------------------------------------------------------
function numberOr(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : parse(raw);
}

function buildRequest() {
  const mode = $("mode").value;
  const body = {
    model: $("model").value,
    stream: true,
    diffusing: true,
    stream_options: { include_usage: true },
    max_tokens: numberOr("max-tokens", parseInt),
    temperature: numberOr("temperature", parseFloat),
    denoising_steps: numberOr("steps", parseInt),
    quality: $("quality").value,
    block_length: numberOr("block-length", parseInt),
    remasking: $("remasking").value || undefined,
  };
  const prompt = $("prompt").value;
  if (mode === "chat") {
    body.messages = [{ role: "user", content: prompt }];
    return { path: "/v1/chat/completions", body, before: "", after: "" };
  }
  body.prompt = prompt;
  if (mode === "fim") body.suffix = $("suffix").value;
  return { path: "/v1/completions", body, before: prompt, after: body.suffix || "" };
}

// The SSE events of a fetch response, one parsed JSON object at a time.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: "))
        .map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function setStat(id, value, text) {
  $(id).dataset.value = value;
  $(id).textContent = text;
}

function showStats(run) {
  const u = run.usage || {};
  const seconds = (run.end - run.start) / 1000;
  const tokens = u.completion_tokens;
  setStat("stat-steps", u.denoising_steps_per_block ?? run.headerSteps,
    String(u.denoising_steps_per_block ?? run.headerSteps));
  setStat("stat-passes", u.denoising_steps, String(u.denoising_steps));
  setStat("stat-tokens", tokens, String(tokens));
  setStat("stat-tpp", tokens / u.denoising_steps, (tokens / u.denoising_steps).toFixed(2));
  const ttft = run.firstText === null ? null : (run.firstText - run.start) / 1000;
  setStat("stat-ttft", ttft ?? "", ttft === null ? "-" : ttft.toFixed(3) + " s");
  setStat("stat-elapsed", seconds, seconds.toFixed(3) + " s");
  setStat("stat-tps", tokens / seconds, (tokens / seconds).toFixed(1));
}

function resetOutput(req) {
  stopPlayback();
  lastCanvas = "";
  context = { before: req.before, shown: null };
  $("before").textContent = req.before;
  $("after").textContent = req.after;
  $("gen").replaceChildren();
  for (const cell of document.querySelectorAll("#stats td")) {
    cell.textContent = "-";
    delete cell.dataset.value;
  }
}

async function generate(event) {
  event.preventDefault();
  const req = buildRequest();
  resetOutput(req);
  showError("");
  $("run").disabled = true;
  $("stop").disabled = false;
  $("phase").className = "running";
  $("phase").textContent = "waiting for the first step";
  controller = new AbortController();
  const run = { start: performance.now(), firstText: null, text: "", usage: null,
                finish: null, headerSteps: null, end: null };
  try {
    const response = await api(req.path, { method: "POST", body: JSON.stringify(req.body),
                                           signal: controller.signal });
    run.headerSteps = response.headers.get("x-denoising-steps");
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) run.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const text = choice.delta ? choice.delta.content : choice.text;
        if (text) {
          if (run.firstText === null) run.firstText = performance.now();
          run.text += text;
        }
        if (choice.diffusion) enqueue(choice.diffusion);
        if (choice.finish_reason) run.finish = choice.finish_reason;
      }
    }
    run.end = performance.now();
    enqueue({ done: () => finished(run) });
  } catch (e) {
    stopPlayback();
    showError(e.name === "AbortError" ? "stopped" : e.message);
    idle(e.name === "AbortError" ? "stopped" : "failed");
  }
}

function finished(run) {
  const gen = $("gen");
  gen.replaceChildren();
  gen.textContent = run.text; // the final answer: what the API's text fields said
  $("before").textContent = context.before;
  showStats(run);
  idle(`done \u00b7 ${run.finish}`);
}

function idle(phase) {
  $("phase").className = "dim";
  $("phase").textContent = phase;
  $("run").disabled = false;
  $("stop").disabled = true;
  controller = null;
}

// --- the cluster panel -------------------------------------------------------------------------
function spark(id, values, top) {
  const step = 120 / (HISTORY - 1);
  const offset = HISTORY - values.length;
  $(id).setAttribute("points", values.map((v, k) =>
    `${((offset + k) * step).toFixed(1)},${(40 - 38 * Math.min(v / top, 1)).toFixed(1)}`
  ).join(" "));
}

function showHealth(h) {
  const load = h.load || {};
  const badge = $("health-status");
  badge.textContent = h.status;
  badge.className = "badge " + h.status;
  $("h-replicas").textContent = load.replicas;
  $("h-backlog").textContent = Math.round(load.token_backlog);
  $("h-drain").textContent = Number(load.drain_s).toFixed(2) + " s";
  $("h-capacity").textContent = Math.round(load.capacity) + " tok/s";
  $("h-rung").textContent = h.rung;
  $("h-steps").textContent = h.steps;
  $("h-inflight").textContent = h.inflight;
  $("h-updated").textContent = new Date().toLocaleTimeString();
  for (const [name, value] of [["steps", h.steps], ["drain", load.drain_s]]) {
    history[name].push(Number(value) || 0);
    if (history[name].length > HISTORY) history[name].shift();
  }
  spark("spark-steps", history.steps, Math.max(...history.steps, 1));
  spark("spark-drain", history.drain, Math.max(...history.drain, 1));
}

async function pollHealth() {
  try {
    // 503 (no replica reporting) still carries the body
    const response = await fetch(BASE + "/health", { headers: authHeaders() });
    showHealth(await response.json());
  } catch (e) {
    $("health-status").textContent = "unreachable";
    $("health-status").className = "badge error";
  }
  setTimeout(pollHealth, 1000);
}

// --- start -------------------------------------------------------------------------------------
function start() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    loadModels();
  });
  $("mode").addEventListener("change", () => {
    $("suffix-box").hidden = $("mode").value !== "fim";
  });
  $("model").addEventListener("change", showCard);
  $("steps").addEventListener("input", () => {
    $("quality").disabled = $("steps").value.trim() !== ""; // a pinned count bypasses it
  });
  $("form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  loadModels(); // without a key this fails visibly (401) where the server requires one
  pollHealth();
}

start();
