// The page at /: draw a digit and watch the model. Plain JavaScript, no build step, no dependencies.
// Every number on the page comes from the service's public API, called with relative URLs so that
// the page also works behind a path prefix.

const $ = (id) => document.getElementById(id);
const DIGIT_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                       "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]; // matplotlib's tab10, as latent.png
const NEIGHBOURS = 8;       // nearest real digits shown under the drawing
const WALK_STEPS = 12;      // points on a walk between two digits, both ends included
const WALK_FRAME_MS = 160;  // how long each step of a walk is shown while it plays
const STROKE = 18;          // pen width on the 280 px pad: about 2 px once the digit is scaled to MNIST's 20 px box
const DEBOUNCE_MS = 100;    // while drawing, at most one analysis per this long

const state = {
  models: [],
  model: null,              // the picked entry of GET /models
  maps: new Map(),          // model name -> {extent, base: canvas}
  ops: [],                  // what is on the pad: {kind: "stroke", points} or {kind: "image", file, bitmap}
  posterior: null,          // {mu, sigma} of the drawn image (2-D models)
  cursor: null,             // [z0, z1] being decoded on the map
  strokeEndAt: null,        // performance.now() when the last stroke ended, until its result is on screen
  kept: null,               // the code (posterior mean) of a drawing kept as the far end of a walk
};
// Read by the end-to-end tests and bench/page.py: milliseconds from the end of a stroke to its result on screen.
window.vaePage = { timings: [], analyses: 0 };

// ---------- the API ----------

function modelQuery(extra = {}) {
  return new URLSearchParams({ model: state.model.name, ...extra }).toString();
}

// With VAE_API_KEYS set, the API wants `Authorization: Bearer <key>`: the page asks for the key once
// (a 401 shows the form), keeps it for this tab (sessionStorage) and sends it with every call.
const KEY_ITEM = "vae-api-key";

async function call(path, init = {}) {
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = new Headers(init.headers);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...init, headers });
  if (response.status === 401) $("key-form").hidden = false;
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? "");
      message = detail ? `${body.error}: ${detail}` : body.error;
    } catch { /* not JSON: keep the status line */ }
    throw new Error(`${path.split("?")[0]}: ${message}`);
  }
  return response;
}

function report(error) {
  $("status").textContent = error ? String(error.message || error) : "";
}

// One call in flight at a time; calls made meanwhile collapse into one, run with the newest argument.
function latestOnly(task) {
  let running = false;
  let queued = null;
  const run = async (arg) => {
    if (running) { queued = { arg }; return; }
    running = true;
    try { await task(arg); } catch (error) { report(error); } finally {
      running = false;
      if (queued) { const next = queued; queued = null; run(next.arg); }
    }
  };
  return run;
}

// ---------- the drawing pad ----------

const pad = $("pad");
const padCtx = pad.getContext("2d");
let stroke = null;

function padPoint(event) {
  const r = pad.getBoundingClientRect();
  return [(event.clientX - r.left) * pad.width / r.width, (event.clientY - r.top) * pad.height / r.height];
}

function drawStroke(points) {
  padCtx.strokeStyle = padCtx.fillStyle = "#fff";
  padCtx.lineWidth = STROKE;
  padCtx.lineCap = padCtx.lineJoin = "round";
  if (points.length === 1) {
    padCtx.beginPath();
    padCtx.arc(points[0][0], points[0][1], STROKE / 2, 0, 2 * Math.PI);
    padCtx.fill();
    return;
  }
  padCtx.beginPath();
  padCtx.moveTo(...points[0]);
  for (const p of points.slice(1)) padCtx.lineTo(...p);
  padCtx.stroke();
}

function drawImageOp(op) {
  if (!op.bitmap) {
    padCtx.fillStyle = "#aaa";
    padCtx.font = "14px system-ui, sans-serif";
    padCtx.fillText(`${op.file.name}: no preview here`, 12, 24);
    return;
  }
  const scale = Math.min(pad.width / op.bitmap.width, pad.height / op.bitmap.height);
  const w = op.bitmap.width * scale;
  const h = op.bitmap.height * scale;
  padCtx.drawImage(op.bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
}

function redrawPad() {
  padCtx.fillStyle = "#000";
  padCtx.fillRect(0, 0, pad.width, pad.height);
  for (const op of state.ops) {
    if (op.kind === "stroke") drawStroke(op.points);
    else drawImageOp(op);
  }
  $("undo").disabled = $("clear").disabled = $("keep").disabled = state.ops.length === 0;
}

pad.addEventListener("pointerdown", (event) => {
  if (event.pointerType === "mouse" && event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  state.strokeEndAt = null; // timed from this stroke's end, not from an earlier change
  stroke = { kind: "stroke", points: [padPoint(event)] };
  state.ops.push(stroke);
  redrawPad();
  scheduleAnalysis();
});

pad.addEventListener("pointermove", (event) => {
  if (!stroke) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  const from = stroke.points.length - 1;
  for (const e of events.length ? events : [event]) stroke.points.push(padPoint(e));
  drawStroke(stroke.points.slice(from)); // only the new piece: redrawing everything on each move lags on a phone
  scheduleAnalysis();
});

function endStroke() {
  if (!stroke) return;
  stroke = null;
  state.strokeEndAt = performance.now();
  redrawPad(); // the stroke as one path, exactly as Undo will redraw it
  analyseNow();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

$("undo").addEventListener("click", () => { state.ops.pop(); changed(); });
$("clear").addEventListener("click", () => { state.ops = []; changed(); });

async function openImage(file) {
  if (!file) return;
  let bitmap = null;
  try { bitmap = await createImageBitmap(file); } catch { /* e.g. TIFF: the service still reads it */ }
  state.ops = [{ kind: "image", file, bitmap }];
  changed();
}
$("file").addEventListener("change", (event) => { openImage(event.target.files[0]); event.target.value = ""; });
pad.addEventListener("dragover", (event) => { event.preventDefault(); pad.classList.add("dropping"); });
pad.addEventListener("dragleave", () => pad.classList.remove("dropping"));
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("dropping");
  openImage(event.dataTransfer.files[0]);
});

function changed() {
  redrawPad();
  state.strokeEndAt = performance.now();
  analyseNow();
}

// What goes to the service: an opened file as it is (the service's preprocessing is made for photos
// and scans), anything drawn as a PNG of the pad.
function padBody() {
  if (state.ops.length === 0) return Promise.resolve(null);
  const only = state.ops.length === 1 ? state.ops[0] : null;
  if (only && only.kind === "image") return Promise.resolve(only.file);
  return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
}

// ---------- analysis: input as seen, reconstruction, anomaly score, posterior ----------

let analysisTimer = null;
let issued = 0;   // analyses started
let rendered = 0; // the newest analysis on screen: an older one that answers later is dropped

// While drawing: at most one analysis per DEBOUNCE_MS, and one in flight.
function scheduleAnalysis() {
  if (analysisTimer === null) analysisTimer = setTimeout(() => { analysisTimer = null; analyseWhileDrawing(); }, DEBOUNCE_MS);
}

// When a stroke ends (or the image changes otherwise): at once, without waiting for one in flight.
function analyseNow() {
  clearTimeout(analysisTimer);
  analysisTimer = null;
  analyse().catch(report);
}

const analyseWhileDrawing = latestOnly(() => analyse());

async function analyse() {
  const seq = ++issued;
  const started = performance.now();
  const model = state.model;
  const body = await padBody();
  if (!model || seq < rendered) return;
  if (!body) { rendered = seq; state.strokeEndAt = null; showNothing(); return; }
  const init = { method: "POST", body, headers: { "Content-Type": body.type || "application/octet-stream" } };
  const similar = model.capabilities && model.capabilities.similar;
  const [recon, scored, encoded, near, nearPng] = await Promise.all([
    call(`reconstruct?${modelQuery({ format: "json" })}`, init).then((r) => r.json()),
    call(`anomaly-score?${modelQuery()}`, init).then((r) => r.json()),
    model.latent_dim === 2 ? call(`encode?${modelQuery()}`, init).then((r) => r.json()) : null,
    similar ? call(`similar?${modelQuery({ k: NEIGHBOURS })}`, init).then((r) => r.json()) : null,
    similar ? call(`similar?${modelQuery({ k: NEIGHBOURS, format: "png" })}`, init).then((r) => r.blob()) : null,
  ]);
  if (model !== state.model || seq < rendered) return; // outrun by a newer analysis, or another model picked
  rendered = seq;
  showPixels($("input28"), recon.originals[0]);
  showPixels($("recon28"), recon.images[0]);
  showScore(scored);
  showNeighbours(near, nearPng);
  state.posterior = encoded && {
    mu: encoded.mu, sigma: encoded.logvar.map((v) => Math.exp(0.5 * v)),
  };
  showPosterior();
  report(null);
  window.vaePage.analyses += 1;
  if (state.strokeEndAt !== null && started >= state.strokeEndAt) {
    window.vaePage.timings.push(performance.now() - state.strokeEndAt);
    state.strokeEndAt = null;
  }
}

// A 28x28 image of pixels in [0, 1] (the API's JSON) drawn into a canvas, x pixels from its left edge.
function showPixels(canvas, rows, x = 0) {
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(28, 28);
  rows.flat().forEach((v, i) => {
    const g = Math.round(Math.min(1, Math.max(0, v)) * 255);
    img.data.set([g, g, g, 255], i * 4);
  });
  ctx.putImageData(img, x, 0);
}

let neighboursUrl = null;
function showNeighbours(near, png) {
  $("nearest").hidden = !near;
  if (!near) return;
  if (neighboursUrl) URL.revokeObjectURL(neighboursUrl);
  neighboursUrl = URL.createObjectURL(png);
  $("neighbours").src = neighboursUrl;
  const labels = near.neighbours.map((n) => n.label);
  const votes = labels.filter((d) => d === labels[0]).length;
  $("neighbours-note").textContent = `Nearest first: ${labels.join(", ")} (training images ` +
    `${near.neighbours.map((n) => n.index).join(", ")}); the nearest is a ${labels[0]}` +
    `${votes > 1 ? `, as are ${votes - 1} more of the ${labels.length}` : ""}.`;
}

function clearPixels(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function showNothing() {
  clearPixels($("input28"));
  clearPixels($("recon28"));
  $("score").dataset.state = "empty";
  $("verdict").textContent = "Draw something";
  $("percentile").value = 0;
  $("score-text").textContent = "The anomaly score says how unlike the held-out MNIST digits your image is.";
  state.posterior = null;
  showPosterior();
  $("nearest").hidden = true;
}

function ordinal(p) {
  return `${p.toFixed(1)}th`;
}

function showScore(s) {
  const score = $("score");
  if (s.percentile === null || s.percentile === undefined) {
    score.dataset.state = "uncalibrated";
    $("verdict").textContent = "Scored (this model has no calibration)";
    $("percentile").value = 0;
    $("score-text").textContent = `Anomaly score ${s.score.toFixed(2)} (${s.method}, k=${s.k}).`;
    return;
  }
  score.dataset.state = s.is_anomaly ? "anomaly" : "digit";
  $("verdict").textContent = s.is_anomaly ? "Not like an MNIST digit" : "Looks like an MNIST digit";
  $("percentile").value = s.percentile;
  $("score-text").textContent = `Anomaly score ${s.score.toFixed(2)} (${s.method}, k=${s.k}): ` +
    `${ordinal(s.percentile)} percentile of held-out MNIST digits. Above the ` +
    `${ordinal(s.threshold_percentile)} (${s.threshold.toFixed(2)}) counts as an anomaly.`;
}

// ---------- the latent map (2-D models) ----------

const mapCanvas = $("map");
const mapCtx = mapCanvas.getContext("2d");

function toCanvas(extent, z) {
  const [x0, x1, y0, y1] = extent;
  return [(z[0] - x0) / (x1 - x0) * mapCanvas.width, (y1 - z[1]) / (y1 - y0) * mapCanvas.height];
}

function toLatent(extent, event) {
  const [x0, x1, y0, y1] = extent;
  const r = mapCanvas.getBoundingClientRect();
  const u = Math.min(1, Math.max(0, (event.clientX - r.left) / r.width));
  const v = Math.min(1, Math.max(0, (event.clientY - r.top) / r.height));
  return [x0 + u * (x1 - x0), y1 - v * (y1 - y0)];
}

// The test set, drawn once per model into an offscreen canvas: the overlay redraws on every move.
function renderBase(data) {
  const base = document.createElement("canvas");
  base.width = mapCanvas.width;
  base.height = mapCanvas.height;
  const ctx = base.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, base.width, base.height);
  const [x0, x1, y0, y1] = data.extent;
  ctx.strokeStyle = "#e6e8ec";
  ctx.fillStyle = "#8a909c";
  ctx.font = "11px system-ui, sans-serif";
  for (let x = Math.ceil(x0); x <= x1; x += 1) {
    const [cx] = toCanvas(data.extent, [x, 0]);
    ctx.beginPath(); ctx.moveTo(cx, 0); ctx.lineTo(cx, base.height); ctx.stroke();
    ctx.fillText(String(x), cx + 2, base.height - 4);
  }
  for (let y = Math.ceil(y0); y <= y1; y += 1) {
    const [, cy] = toCanvas(data.extent, [0, y]);
    ctx.beginPath(); ctx.moveTo(0, cy); ctx.lineTo(base.width, cy); ctx.stroke();
    ctx.fillText(String(y), 3, cy - 2);
  }
  ctx.globalAlpha = 0.55;
  for (let i = 0; i < data.n; i += 1) {
    const [cx, cy] = toCanvas(data.extent, [data.x[i], data.y[i]]);
    ctx.fillStyle = DIGIT_COLOURS[data.label[i]];
    ctx.fillRect(cx - 1.25, cy - 1.25, 2.5, 2.5);
  }
  ctx.globalAlpha = 1;
  return { extent: data.extent, base };
}

async function loadMap(model) {
  if (!model.latent_map) return null;
  if (!state.maps.has(model.name)) {
    const data = await (await call(model.latent_map.replace(/^\//, ""))).json();
    state.maps.set(model.name, renderBase(data));
  }
  return state.maps.get(model.name);
}

function currentMap() {
  return state.model ? state.maps.get(state.model.name) : undefined;
}

function drawMap() {
  const map = currentMap();
  if (!map) return;
  mapCtx.drawImage(map.base, 0, 0);
  if (state.cursor) {
    const [cx, cy] = toCanvas(map.extent, state.cursor);
    mapCtx.strokeStyle = "#1b1d21";
    mapCtx.lineWidth = 1.5;
    mapCtx.beginPath(); mapCtx.arc(cx, cy, 7, 0, 2 * Math.PI); mapCtx.stroke();
    mapCtx.beginPath();
    mapCtx.moveTo(cx - 12, cy); mapCtx.lineTo(cx - 4, cy); mapCtx.moveTo(cx + 4, cy); mapCtx.lineTo(cx + 12, cy);
    mapCtx.moveTo(cx, cy - 12); mapCtx.lineTo(cx, cy - 4); mapCtx.moveTo(cx, cy + 4); mapCtx.lineTo(cx, cy + 12);
    mapCtx.stroke();
  }
  const p = state.posterior;
  if (p) {
    const [x0, x1, y0, y1] = map.extent;
    const [cx, cy] = toCanvas(map.extent, p.mu);
    const sx = mapCanvas.width / (x1 - x0);
    const sy = mapCanvas.height / (y1 - y0);
    for (const [k, alpha] of [[2, 0.12], [1, 0.22]]) { // the diagonal Gaussian's 2σ and 1σ ellipses
      mapCtx.beginPath();
      mapCtx.ellipse(cx, cy, Math.max(1, k * p.sigma[0] * sx), Math.max(1, k * p.sigma[1] * sy), 0, 0, 2 * Math.PI);
      mapCtx.fillStyle = `rgba(20, 20, 20, ${alpha})`;
      mapCtx.fill();
      mapCtx.strokeStyle = "#1b1d21";
      mapCtx.lineWidth = 1.5;
      mapCtx.stroke();
    }
    mapCtx.beginPath();
    mapCtx.arc(cx, cy, 6, 0, 2 * Math.PI);
    mapCtx.fillStyle = "#fff";
    mapCtx.fill();
    mapCtx.lineWidth = 3;
    mapCtx.stroke();
  }
}

function showPosterior() {
  const p = state.posterior;
  $("posterior").textContent = p
    ? `Your image: μ = (${p.mu[0].toFixed(2)}, ${p.mu[1].toFixed(2)}), σ = (${p.sigma[0].toFixed(2)}, ` +
      `${p.sigma[1].toFixed(2)}); drawn as a point with its 1σ and 2σ ellipses.`
    : "Your digit lands here as a point, with its 1σ and 2σ ellipses.";
  drawMap();
}

let decodedUrl = null;
const decode = latestOnly(async (z) => {
  const model = state.model;
  const response = await call(`decode?${modelQuery({ format: "png" })}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ z: [z] }),
  });
  const blob = await response.blob();
  if (model !== state.model) return;
  if (decodedUrl) URL.revokeObjectURL(decodedUrl);
  decodedUrl = URL.createObjectURL(blob);
  $("decoded").src = decodedUrl;
  $("decoded-z").textContent = `decoded at z = (${z[0].toFixed(2)}, ${z[1].toFixed(2)})`;
});

// Until the map is pointed at, its box shows the image at the prior's centre, z = (0, 0).
async function showCentre() {
  const model = state.model;
  const response = await call(`decode?${modelQuery({ format: "png" })}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ z: [[0, 0]] }),
  });
  const blob = await response.blob();
  if (model !== state.model || state.cursor) return;
  if (decodedUrl) URL.revokeObjectURL(decodedUrl);
  decodedUrl = URL.createObjectURL(blob);
  $("decoded").src = decodedUrl;
  $("decoded-z").textContent = "The prior's centre, z = (0, 0): point at the map to decode elsewhere";
}

function pointAt(z) {
  state.cursor = z;
  drawMap();
  decode(z);
}

let dragging = false;
mapCanvas.addEventListener("pointerdown", (event) => {
  const map = currentMap();
  if (!map) return;
  dragging = true;
  mapCanvas.setPointerCapture(event.pointerId);
  pointAt(toLatent(map.extent, event));
});
mapCanvas.addEventListener("pointermove", (event) => {
  const map = currentMap();
  // a mouse or pen decodes as it hovers; a finger only while it drags
  if (map && (dragging || event.pointerType !== "touch")) pointAt(toLatent(map.extent, event));
});
mapCanvas.addEventListener("pointerup", () => { dragging = false; });
mapCanvas.addEventListener("pointercancel", () => { dragging = false; });
mapCanvas.addEventListener("keydown", (event) => {
  const map = currentMap();
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, 1], ArrowDown: [0, -1] };
  if (!map || !(event.key in moves || event.key === "Home")) return;
  event.preventDefault();
  const [x0, x1, y0, y1] = map.extent;
  const step = event.shiftKey ? 0.1 : 0.025;
  const [dx, dy] = moves[event.key] || [0, 0];
  const z = event.key === "Home" || !state.cursor ? [(x0 + x1) / 2, (y0 + y1) / 2] : state.cursor;
  pointAt([Math.min(x1, Math.max(x0, z[0] + dx * step * (x1 - x0))),
           Math.min(y1, Math.max(y0, z[1] + dy * step * (y1 - y0)))]);
});

$("legend").replaceChildren(...DIGIT_COLOURS.map((colour, digit) => {
  const item = document.createElement("li");
  const dot = document.createElement("span");
  dot.style.background = colour;
  item.append(dot, String(digit));
  return item;
}));

// ---------- samples ----------

let gridUrl = null;
let sampledDigit = null; // the digit the grid shows, or null for draws from the prior
let temperatureMoved = false; // until the slider is moved, a digit is sampled at the service's default for one
async function sample() {
  const extra = { n: $("count").value, temperature: $("temperature").value, format: "png" };
  if ($("seed").value !== "") extra.seed = $("seed").value;
  if (sampledDigit !== null) {
    extra.digit = sampledDigit;
    if (!temperatureMoved) delete extra.temperature;
  }
  const response = await call(`sample?${modelQuery(extra)}`);
  const blob = await response.blob();
  if (gridUrl) URL.revokeObjectURL(gridUrl);
  gridUrl = URL.createObjectURL(blob);
  $("grid").src = gridUrl;
  $("grid").hidden = false;
  const seed = response.headers.get("X-Seed");
  const what = sampledDigit === null ? "samples" : `samples of the digit ${sampledDigit} (from its Gaussian in latent space)`;
  const temperature = extra.temperature ?? "0.8 (the default for one digit)";
  $("sample-note").textContent = `${extra.n} ${what} from ${state.model.name} at temperature ${temperature}, ` +
    `seed ${seed}: the same seed draws the same grid.`;
  report(null);
}
$("sample-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sampledDigit = null;
  sample().catch(report);
});
$("digit-buttons").append(...Array.from({ length: 10 }, (_, digit) => {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = String(digit);
  button.setAttribute("aria-label", `Sample ${digit}s`);
  button.dataset.digit = String(digit);
  button.addEventListener("click", () => { sampledDigit = digit; sample().catch(report); });
  return button;
}));
$("temperature").addEventListener("input", (event) => {
  temperatureMoved = true;
  $("temperature-value").textContent = Number(event.target.value).toFixed(1);
});

// ---------- a walk between two digits ----------

const walk = { frames: [], at: 0, timer: null };

async function codeOfDrawing() {
  const body = await padBody();
  if (!body) throw new Error("Draw a digit (or open an image) first");
  const init = { method: "POST", body, headers: { "Content-Type": body.type || "application/octet-stream" } };
  return (await (await call(`encode?${modelQuery()}`, init)).json()).mu;
}

async function walkTo() {
  const model = state.model;
  const from = await codeOfDrawing();
  const target = $("walk-to").value;
  const to = target === "kept" ? state.kept
    : (await (await call(`sample?${modelQuery({ digit: target, n: 1, format: "json" })}`)).json()).z[0];
  const response = await call(`interpolate?${modelQuery({ steps: WALK_STEPS, path: $("walk-path").value, format: "json" })}`,
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ z: [from, to] }) });
  const path = await response.json();
  if (model !== state.model) return;
  const strip = $("walk-strip");
  strip.width = 28 * path.images.length;
  strip.hidden = false;
  path.images.forEach((rows, i) => showPixels(strip, rows, 28 * i));
  walk.frames = path.images;
  $("walk-step").max = String(path.images.length - 1);
  $("walk-step").disabled = $("walk-play").disabled = false;
  const towards = target === "kept" ? "the kept drawing" : `a sampled ${target}`;
  $("walk-note").textContent = `${path.images.length} steps from your drawing to ${towards} along the ` +
    `${path.path === "slerp" ? "arc (slerp)" : "straight line"} between their codes.`;
  play(true);
  report(null);
}

function showStep(i) {
  walk.at = i;
  showPixels($("walk-frame"), walk.frames[i]);
  $("walk-step").value = String(i);
}

// Plays back and forth, from the drawing to the other digit and back, until paused.
function play(on) {
  clearInterval(walk.timer);
  walk.timer = null;
  let direction = 1;
  if (on) {
    showStep(0);
    walk.timer = setInterval(() => {
      if (walk.at + direction < 0 || walk.at + direction >= walk.frames.length) direction = -direction;
      showStep(walk.at + direction);
    }, WALK_FRAME_MS);
  }
  $("walk-play").textContent = on ? "Pause" : "Play";
}

$("walk-to").replaceChildren(...Array.from({ length: 10 }, (_, d) => new Option(`a sampled ${d}`, String(d))),
  new Option("the kept drawing", "kept"));
$("walk-form").addEventListener("submit", (event) => { event.preventDefault(); walkTo().catch(report); });
$("walk-play").addEventListener("click", () => play(walk.timer === null));
$("walk-step").addEventListener("input", (event) => { play(false); showStep(Number(event.target.value)); });
$("keep").addEventListener("click", () => {
  codeOfDrawing().then((mu) => {
    state.kept = mu;
    $("walk-to").value = "kept";
    setWalkControls();
    $("walk-note").textContent = "Kept. Draw a second digit and walk from it to the kept one.";
  }).catch(report);
});

function setWalkControls() {
  const model = state.model;
  const digits = Boolean(model.capabilities && model.capabilities.sample_digit);
  for (const option of $("walk-to").options) option.disabled = option.value === "kept" ? !state.kept : !digits;
  if ($("walk-to").selectedOptions[0]?.disabled) $("walk-to").value = state.kept ? "kept" : "0";
  $("walk-go").disabled = !digits && !state.kept;
  $("keep").disabled = state.ops.length === 0;
  for (const button of $("digit-buttons").querySelectorAll("button")) button.disabled = !digits;
}

// ---------- models ----------

async function pick(name) {
  state.model = state.models.find((m) => m.name === name);
  const url = new URL(window.location.href);
  url.searchParams.set("model", name);
  window.history.replaceState(null, "", url);
  state.cursor = null;
  state.posterior = null;
  state.kept = null; // a code is only meaningful in the latent space it came from
  play(false);
  $("walk-strip").hidden = true;
  $("walk-step").disabled = $("walk-play").disabled = true;
  $("decoded").removeAttribute("src");
  $("decoded-z").textContent = "Point at the map to decode";
  setWalkControls();
  const model = state.model;
  const map = await loadMap(model);
  if (model !== state.model) return;
  if (map) await showCentre();
  $("map-area").hidden = $("posterior").hidden = !map;
  $("no-map").hidden = Boolean(map);
  const mapped = state.models.filter((m) => m.latent_map).map((m) => m.name);
  const suggestion = mapped.length ? ` (pick ${mapped.join(" or ")})` : "";
  $("no-map").textContent = map ? "" : `${model.name} has a ${model.latent_dim}-D latent space: the map is drawn ` +
    `for models with a 2-D one${suggestion}.`;
  showPosterior();
  analyseNow();
  if (!$("grid").hidden) {
    if (!(model.capabilities && model.capabilities.sample_digit)) sampledDigit = null;
    await sample();
  }
}

async function start() {
  let listing = await (await call("models")).json();
  while (listing.models.length === 0) { // the service is still loading its models
    report(new Error("The models are still loading…"));
    await new Promise((resolve) => setTimeout(resolve, 1000));
    listing = await (await call("models")).json();
  }
  report(null);
  state.models = listing.models;
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(`${m.name} (${m.latent_dim}-D latent)`, m.name)));
  // ?model= wins; else a model with a map, the most telling first view; else the service's default
  const asked = new URL(window.location.href).searchParams.get("model");
  const names = state.models.map((m) => m.name);
  const first = names.includes(asked) ? asked
    : (state.models.find((m) => m.latent_map) || state.models.find((m) => m.name === listing.default)).name;
  select.value = first;
  select.disabled = false;
  select.addEventListener("change", () => pick(select.value).catch(report));
  redrawPad();
  await pick(first);
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("api-key").value.trim());
  window.location.reload();
});

start().catch(report);
