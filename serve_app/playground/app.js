// sdxl-serve playground: plain JavaScript, no build step, nothing loaded from elsewhere.
//
// Everything runs through the public HTTP API: a run is an async job (POST /v1/jobs), followed
// through its server-sent events (read with fetch, which can send the API key; EventSource
// cannot) and fetched from /v1/jobs/{id}/result; a batch is POST /v1/images/batch with async: true.
// The API key typed in is kept in sessionStorage only (this tab, until it closes) and sent as
// "Authorization: Bearer". Server data is only ever written as text (no innerHTML).
"use strict";

const KEY_STORAGE = "sdxl-serve.api-key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);
// The page's numeric controls and the request field each sets: their bounds, integer steps,
// defaults and tooltips come from that field's schema (config.json's `fields`). A LoRA's weight
// ("loras.weight") is set on each weight field as the list is drawn.
const FIELD_CONTROLS = {
  width: "width",
  height: "height",
  steps: "num_inference_steps",
  guidance: "guidance_scale",
  seed: "seed",
  n: "n",
  strength: "strength",
  "mask-blur": "mask_blur",
  "control-scale": "controlnet.conditioning_scale",
  "control-start": "controlnet.guidance_start",
  "control-end": "controlnet.guidance_end",
  "refiner-switch": "refiner.switch_at",
  "refiner-strength": "refiner.strength",
  "hires-scale": "hires.scale",
  "hires-strength": "hires.strength",
};

const state = {
  config: null,
  apiRoot: null, // the app's root URL (ends with "/"): the playground may sit under a proxy's prefix
  busy: false, // a run is being submitted or followed
  job: null, // the job followed: {id, started}
  image: null, // the starting image: {dataUrl, width, height}
  control: null, // the control picture as a data: URL
  controlMapUrl: null,
  refinerServed: false,
  painting: null,
  batchUrl: null,
};

// -- the API -------------------------------------------------------------------------------------

function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), state.apiRoot).href;
}

function apiKey() {
  return $("api-key").value.trim();
}

async function api(path, { method = "GET", json, signal } = {}) {
  const headers = new Headers();
  const key = apiKey();
  if (key) headers.set("Authorization", "Bearer " + key);
  const init = { method, headers, signal };
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  }
  const response = await fetch(apiUrl(path), init);
  if (!response.ok) throw await apiError(response);
  return response;
}

async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message;
      param = body.error.param;
    }
  } catch (_) {
    // not the error envelope: keep the status line
  }
  const error = new Error(message);
  error.status = response.status;
  error.param = param;
  return error;
}

function showError(error) {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  let text = error.message || String(error);
  if (error.param && !text.includes(error.param)) text += ` (${error.param})`;
  if (error.status === 401) text += " Enter an API key at the top of the page.";
  box.textContent = text;
  box.hidden = false;
}

// -- start ---------------------------------------------------------------------------------------

async function init() {
  const response = await fetch("config.json", { cache: "no-cache" });
  const config = await response.json();
  state.config = config;
  const depth = config.path.split("/").length - 1;
  state.apiRoot = new URL("../".repeat(depth), location.href);
  $("docs-link").href = apiUrl("docs");
  fillForm(config);
  wire();
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) $("api-key").value = saved;
  $("api-key").placeholder = config.auth ? "required" : "not needed";
  onModeChange();
  await Promise.all([checkHealth(), loadLists()]);
  document.body.dataset.ready = "true";
}

function fillForm(config) {
  const { defaults, limits } = config;
  for (const [id, field] of Object.entries(FIELD_CONTROLS)) {
    const input = $(id);
    const schema = config.fields[field];
    applySchema(input, schema);
    if (input.value === "" && schema.default !== undefined) input.value = String(schema.default);
  }
  // The model's defaults, and the deployment's limits (/openapi.json writes those over these schemas too).
  for (const side of ["width", "height"]) {
    const input = $(side);
    input.value = defaults[side];
    input.min = limits.min_side;
    input.max = limits.max_side;
  }
  $("steps").value = defaults.steps;
  $("steps").max = limits.max_steps;
  $("guidance").value = defaults.guidance_scale;
  $("n").max = limits.max_n;
  $("prompt").maxLength = limits.max_prompt_chars;
  $("negative-prompt").maxLength = limits.max_prompt_chars;
  const scheduler = $("scheduler");
  for (const [id, name] of Object.entries(config.schedulers)) scheduler.append(new Option(name, id, false, id === defaults.scheduler));
  $("batch-title").textContent = `Batch of prompts (up to ${limits.max_batch_items})`;
  fillAdvanced(config.advanced, defaults);
}

function fillAdvanced({ timestep_spacing: spacing, guidance_end: end, deep_cache_interval: cache }, defaults) {
  // The request schema's own values, bounds and descriptions (config.json): nothing copied here.
  const select = $("timestep-spacing");
  for (const value of spacing.enum) select.append(new Option(value, value));
  select.title = spacing.description;
  const input = $("guidance-end");
  applySchema(input, end);
  input.placeholder = String(end.default);
  const interval = $("deep-cache");
  applySchema(interval, cache);
  // Empty: the deployment's default interval (its model.default_deep_cache_interval).
  interval.placeholder = String(defaults.deep_cache_interval);
}

function applySchema(input, schema) {
  // A request field's bounds, integer step and description (the control's tooltip) from its
  // schema. A number's `step` in index.html is only how finely the page offers it: an exclusive
  // bound becomes the nearest step inside it.
  if (schema.type === "integer") input.step = String(schema.multipleOf || 1);
  const step = Number(input.step) || 0;
  const inside = (bound, toward) => String(Number((bound + toward * step).toFixed(6)));
  if (schema.minimum !== undefined) input.min = String(schema.minimum);
  else if (schema.exclusiveMinimum !== undefined) input.min = inside(schema.exclusiveMinimum, 1);
  if (schema.maximum !== undefined) input.max = String(schema.maximum);
  else if (schema.exclusiveMaximum !== undefined) input.max = inside(schema.exclusiveMaximum, -1);
  if (schema.description) input.title = schema.description;
}

function wire() {
  $("generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("generate-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  $("cancel").addEventListener("click", cancel);
  $("run-batch").addEventListener("click", runBatch);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = "";
    $("seed").focus();
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", onModeChange);
  const keepKey = () => {
    const key = apiKey();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadLists();
  };
  $("api-key").addEventListener("change", keepKey);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault(); // Enter in the key field: keep it, never navigate
    keepKey();
  });
  $("forget-key").addEventListener("click", () => {
    $("api-key").value = "";
    sessionStorage.removeItem(KEY_STORAGE);
    loadLists();
  });
  $("init-image").addEventListener("change", () => loadInitImage($("init-image").files[0]));
  $("clear-mask").addEventListener("click", clearMask);
  $("invert-mask").addEventListener("click", invertMask);
  const mask = $("mask-canvas");
  mask.addEventListener("pointerdown", startPaint);
  mask.addEventListener("pointermove", paint);
  mask.addEventListener("pointerup", stopPaint);
  mask.addEventListener("pointercancel", stopPaint);
  $("controlnet").addEventListener("change", showControlMap);
  $("control-preprocess").addEventListener("change", showControlMap);
  $("control-image").addEventListener("change", async () => {
    const file = $("control-image").files[0];
    state.control = file ? await readDataUrl(file) : null;
    showControlMap();
  });
  $("use-refiner").addEventListener("change", exclusiveStages);
  $("use-hires").addEventListener("change", exclusiveStages);
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function onModeChange() {
  // Each kind's default strength (the server's: 0.75 for img2img, 1 for inpainting).
  $("strength").value = mode() === "inpaint" ? "1" : "0.75";
  showSections();
}

function showSections() {
  const kind = mode();
  $("image-section").hidden = kind === "txt2img";
  $("mask-tools").hidden = kind !== "inpaint";
  $("canvas-stack").classList.toggle("painting", kind === "inpaint");
  $("hires-section").hidden = kind !== "txt2img";
  // The refiner finishes text-to-image and image-to-image; inpainting takes none.
  $("refiner-section").hidden = !state.refinerServed || kind === "inpaint";
  exclusiveStages();
}

function exclusiveStages() {
  // The server refuses hires with the refiner (its stage would need the hires pass's latents).
  const refiner = $("use-refiner").checked && !$("refiner-section").hidden;
  const hires = $("use-hires").checked && !$("hires-section").hidden;
  $("use-hires").disabled = refiner;
  $("use-refiner").disabled = hires;
  $("hires-note").hidden = !refiner;
}

async function checkHealth() {
  const status = $("server-status");
  try {
    const response = await fetch(apiUrl("healthz"));
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    const model = body.model || {};
    status.textContent = `${model.id || state.config.model} on ${model.device || "?"} (${model.dtype || "?"})`;
    status.classList.remove("bad");
    state.refinerServed = (body.engines || []).includes("refiner");
    showSections();
  } catch (error) {
    status.textContent = `Not ready: ${error.message}; trying again…`;
    status.classList.add("bad");
    setTimeout(checkHealth, 3000);
  }
}

async function loadLists() {
  if (state.config.auth && !apiKey()) {
    // Listing needs a key here: ask for one instead of collecting 401s.
    $("lora-section").hidden = true;
    $("controlnet-section").hidden = true;
    $("key-hint").textContent = "This server needs an API key.";
    return;
  }
  $("key-hint").textContent = "";
  await Promise.all([loadLoras(), loadControlNets()]);
}

async function loadLoras() {
  const section = $("lora-section");
  if (state.config.limits.max_loras < 1) {
    section.hidden = true;
    return;
  }
  try {
    const body = await (await api("/v1/loras")).json();
    renderLoras(body.data || []);
    section.hidden = !(body.data || []).length;
  } catch (error) {
    section.hidden = true;
    showError(error);
  }
}

function renderLoras(loras) {
  const list = $("lora-list");
  list.replaceChildren();
  const most = state.config.limits.max_loras;
  const schema = state.config.fields["loras.weight"];
  const signed = (value) => String(value).replace("-", "−");
  $("lora-hint").textContent = `Blend up to ${most}, weights ${signed(schema.minimum)} to ${signed(schema.maximum)}.`;
  loras.forEach((lora, index) => {
    const item = element("li");
    const box = element("input", { type: "checkbox", id: `lora-${index}`, value: lora.name });
    box.disabled = !lora.fits;
    box.dataset.unfit = String(!lora.fits);
    box.addEventListener("change", limitLoras);
    const label = element("label", { for: box.id }, lora.name);
    const weight = element("input", {
      type: "number", id: `lora-${index}-weight`, step: "0.05", value: String(schema.default),
      "aria-label": `Weight of ${lora.name}`,
    });
    applySchema(weight, schema);
    const details = lora.fits
      ? `rank ${lora.rank} · ${(lora.components || []).join(", ")}${lora.builtin ? " · example" : ""}`
      : `does not fit this model: ${lora.error || "unknown"}`;
    item.append(box, label, weight, element("small", {}, details));
    list.append(item);
  });
}

function limitLoras() {
  const boxes = [...document.querySelectorAll("#lora-list input[type=checkbox]")];
  const full = boxes.filter((box) => box.checked).length >= state.config.limits.max_loras;
  for (const box of boxes) if (!box.checked) box.disabled = full || box.dataset.unfit === "true";
}

function selectedLoras() {
  return [...document.querySelectorAll("#lora-list input[type=checkbox]:checked")].map((box) => ({
    name: box.value,
    weight: Number($(`${box.id}-weight`).value || 1),
  }));
}

async function loadControlNets() {
  const section = $("controlnet-section");
  try {
    const body = await (await api("/v1/controlnets")).json();
    const select = $("controlnet");
    const chosen = select.value;
    select.replaceChildren(new Option("none", ""));
    for (const control of body.data || []) {
      select.append(new Option(control.name, control.name, false, control.name === chosen));
    }
    section.hidden = !(body.data || []).length;
  } catch (error) {
    section.hidden = true;
    showError(error);
  }
}

// -- images in, images out -------------------------------------------------------------------------

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot read this image"));
    image.src = src;
  });
}

async function loadInitImage(file) {
  showError(null);
  if (!file) return;
  try {
    const dataUrl = await readDataUrl(file);
    const image = await loadImage(dataUrl);
    const width = image.naturalWidth;
    const height = image.naturalHeight;
    state.image = { dataUrl, width, height };
    for (const canvas of [$("image-canvas"), $("mask-canvas")]) {
      canvas.width = width;
      canvas.height = height;
    }
    $("image-canvas").getContext("2d").drawImage(image, 0, 0);
    clearMask();
    $("canvas-stack").hidden = false;
    const [outWidth, outHeight] = fitSize(width, height);
    $("width").value = outWidth;
    $("height").value = outHeight;
  } catch (error) {
    state.image = null;
    showError(error);
  }
}

function fitSize(width, height) {
  // As the server does without a size: the image's own, scaled down to fit the pixel limit,
  // each side a multiple of 8.
  const { max_pixels: most, min_side: least } = state.config.limits;
  const scale = Math.min(1, Math.sqrt(most / (width * height)));
  const side = (value) => Math.max(least, Math.floor((value * scale) / 8) * 8);
  return [side(width), side(height)];
}

function maskContext() {
  // The mask is read back (getImageData) at every run: keep it in memory the browser can read.
  return $("mask-canvas").getContext("2d", { willReadFrequently: true });
}

function maskPoint(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * canvas.width) / box.width,
    y: ((event.clientY - box.top) * canvas.height) / box.height,
    scale: canvas.width / box.width,
  };
}

function strokeMask(from, to) {
  const context = maskContext();
  context.strokeStyle = "#ff2d2d";
  context.fillStyle = "#ff2d2d";
  context.lineCap = "round";
  context.lineJoin = "round";
  context.lineWidth = Number($("brush-size").value) * to.scale;
  context.beginPath();
  context.moveTo(from.x, from.y);
  context.lineTo(to.x, to.y);
  context.stroke();
}

function startPaint(event) {
  if (mode() !== "inpaint" || !state.image) return;
  event.preventDefault();
  $("mask-canvas").setPointerCapture(event.pointerId);
  state.painting = maskPoint(event);
  strokeMask(state.painting, state.painting);
}

function paint(event) {
  if (!state.painting) return;
  const point = maskPoint(event);
  strokeMask(state.painting, point);
  state.painting = point;
}

function stopPaint() {
  state.painting = null;
}

function clearMask() {
  const canvas = $("mask-canvas");
  maskContext().clearRect(0, 0, canvas.width, canvas.height);
}

function invertMask() {
  const canvas = $("mask-canvas");
  const context = maskContext();
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const painted = data[i + 3] > 0;
    data[i] = 255;
    data[i + 1] = 45;
    data[i + 2] = 45;
    data[i + 3] = painted ? 0 : 255;
  }
  context.putImageData(pixels, 0, 0);
}

function maskDataUrl() {
  // What the API takes: the image's size, white = repaint, black = keep.
  const canvas = $("mask-canvas");
  const source = maskContext().getImageData(0, 0, canvas.width, canvas.height).data;
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const context = out.getContext("2d");
  const pixels = context.createImageData(canvas.width, canvas.height);
  let painted = 0;
  for (let i = 0; i < source.length; i += 4) {
    const value = source[i + 3] > 0 ? 255 : 0;
    painted += value ? 1 : 0;
    pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = value;
    pixels.data[i + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
  return painted ? out.toDataURL("image/png") : null;
}

async function showControlMap() {
  const figure = $("control-map-figure");
  const caption = $("control-map-caption");
  if (!state.control) {
    figure.hidden = true;
    return;
  }
  figure.hidden = false;
  if (!$("control-preprocess").checked) {
    setControlMap(state.control);
    caption.textContent = "The picture is the map (no preprocessing)";
    return;
  }
  caption.textContent = "Making the canny map…";
  try {
    const response = await api("/v1/controlnets/preprocess", {
      method: "POST",
      json: { image: state.control, preprocess: "canny" },
    });
    setControlMap(URL.createObjectURL(await response.blob()));
    caption.textContent = "The canny map it will follow";
  } catch (error) {
    caption.textContent = "No map";
    showError(error);
  }
}

function setControlMap(src) {
  if (state.controlMapUrl) URL.revokeObjectURL(state.controlMapUrl);
  state.controlMapUrl = src.startsWith("blob:") ? src : null;
  $("control-map").src = src;
}

// -- requests --------------------------------------------------------------------------------------

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function generationParams(kind) {
  const params = {
    prompt: $("prompt").value,
    width: number("width"),
    height: number("height"),
    num_inference_steps: number("steps"),
    guidance_scale: number("guidance"),
    scheduler: $("scheduler").value,
    timestep_spacing: $("timestep-spacing").value || undefined,
    guidance_end: number("guidance-end"),
    deep_cache_interval: number("deep-cache"),
    seed: number("seed"),
  };
  const negative = $("negative-prompt").value;
  if (negative.trim()) params.negative_prompt = negative;
  const loras = $("lora-section").hidden ? [] : selectedLoras();
  if (loras.length) params.loras = loras;
  const control = $("controlnet").value;
  if (control && !$("controlnet-section").hidden) {
    if (!state.control) throw fieldError("choose a control image for the ControlNet", "control-image");
    params.controlnet = {
      name: control,
      image: state.control,
      conditioning_scale: number("control-scale"),
      guidance_start: number("control-start"),
      guidance_end: number("control-end"),
      ...($("control-preprocess").checked ? { preprocess: "canny" } : {}),
    };
  }
  if (kind !== "inpaint" && !$("refiner-section").hidden && $("use-refiner").checked) {
    const refinerMode = $("refiner-mode").value;
    params.refiner = refinerMode === "post"
      ? { mode: "post", strength: number("refiner-strength") }
      : { mode: "ensemble", switch_at: number("refiner-switch") };
  }
  if (kind === "txt2img" && !$("hires-section").hidden && $("use-hires").checked) {
    params.hires = { scale: number("hires-scale"), strength: number("hires-strength"), upscaler: $("hires-upscaler").value };
  }
  if (kind !== "txt2img") {
    if (!state.image) throw fieldError("choose a starting image", "init-image");
    params.image = state.image.dataUrl;
    params.strength = number("strength");
  }
  if (kind === "inpaint") {
    params.mask = maskDataUrl();
    if (!params.mask) throw fieldError("paint the part of the image to repaint", "invert-mask");
    const blur = number("mask-blur");
    if (blur) params.mask_blur = blur;
  }
  for (const key of Object.keys(params)) if (params[key] === undefined) delete params[key];
  return params;
}

function fieldError(message, id) {
  const error = new Error(message);
  error.focus = id;
  return error;
}

async function generate() {
  if (state.busy) return;
  showError(null);
  if (!$("prompt").value.trim()) {
    showError(new Error("Write a prompt first."));
    $("prompt").focus();
    return;
  }
  const kind = mode();
  let body;
  try {
    body = { kind, n: number("n") || 1, params: generationParams(kind) };
  } catch (error) {
    showError(error);
    if (error.focus) $(error.focus).focus();
    return;
  }
  await run(() => api("/v1/jobs", { method: "POST", json: body }), { prompt: body.params.prompt });
}

async function runBatch() {
  if (state.busy) return;
  showError(null);
  const prompts = $("batch-prompts").value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (!prompts.length) {
    showError(new Error("Write one prompt a line first."));
    $("batch-prompts").focus();
    return;
  }
  let params;
  try {
    params = generationParams("txt2img");
  } catch (error) {
    showError(error);
    return;
  }
  delete params.prompt;
  const body = { prompts, params, async: true };
  await run(() => api("/v1/images/batch", { method: "POST", json: body }), { batch: true });
}

async function run(submit, info) {
  state.busy = true;
  setRunning(true);
  showProgress({ status: "submitting", progress: { percent: 0 } });
  if (info.batch) $("batch-download").hidden = true;
  try {
    const job = await (await submit()).json();
    await follow(job, info);
  } catch (error) {
    showProgress({ status: "failed", progress: { percent: 0 } });
    showError(error);
  } finally {
    state.job = null;
    state.busy = false;
    setRunning(false);
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("run-batch").disabled = running;
  $("cancel").disabled = !running;
  document.querySelector(".output").setAttribute("aria-busy", String(running));
}

async function follow(job, info) {
  state.job = { id: job.id, started: performance.now() };
  showProgress(job);
  let final = null;
  try {
    final = await streamEvents(job.id);
  } catch (_) {
    final = null; // the stream broke: ask for the state instead
  }
  if (!final) final = await poll(job.id);
  showProgress(final);
  if (final.status === "succeeded") {
    await showResult(final, info);
    showProgress(final, { resultShown: true });
  } else if (final.status === "failed") showError(new Error(`The job failed: ${final.error ? final.error.message : "no reason given"}`));
}

async function streamEvents(id) {
  // Server-sent events through fetch: EventSource cannot send the Authorization header.
  const response = await api(`/v1/jobs/${id}/events`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let final = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return final; // the server closes the stream after `done`
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (!event || !event.data || final) continue;
        const job = JSON.parse(event.data);
        showProgress(job);
        if (event.name === "done" || TERMINAL.has(job.status)) final = job;
      }
    }
  } catch (error) {
    reader.cancel().catch(() => {});
    if (final) return final;
    throw error;
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { name, data: data.join("\n") } : null;
}

async function poll(id) {
  for (;;) {
    const job = await (await api(`/v1/jobs/${id}`)).json();
    showProgress(job);
    if (TERMINAL.has(job.status)) return job;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  $("progress-label").textContent = "Cancelling…";
  try {
    await api(`/v1/jobs/${state.job.id}`, { method: "DELETE" });
  } catch (error) {
    if (error.status !== 409) showError(error); // 409: it had already finished
  }
}

function showProgress(job, { resultShown = false } = {}) {
  // A job that succeeded is done for the person watching once its result is on the page: until
  // then (the result is fetched after the stream's last event) the label says so.
  const status = job.status === "succeeded" && !resultShown ? "fetching" : job.status;
  const bar = $("progress");
  const progress = job.progress || {};
  const percent = Math.max(0, Math.min(100, Number(progress.percent) || 0));
  bar.value = percent;
  bar.dataset.status = status;
  const label = $("progress-label");
  const seconds = state.job ? ((performance.now() - state.job.started) / 1000).toFixed(1) : null;
  const texts = {
    submitting: "Submitting…",
    queued: "Queued",
    running: `Running: step ${progress.step || 0} of ${progress.total || "?"} (${percent.toFixed(0)}%)`,
    fetching: "Fetching the result…",
    succeeded: seconds ? `Done in ${seconds} s` : "Done",
    cancelled: "Cancelled",
    failed: "Failed",
  };
  label.textContent = texts[status] || status;
  label.dataset.status = status;
}

async function showResult(job, info) {
  const response = await api(`/v1/jobs/${job.id}/result`);
  const type = (response.headers.get("Content-Type") || "").split(";")[0];
  const blob = await response.blob();
  let images;
  if (type === "application/zip") {
    const files = await unzip(blob);
    const manifest = JSON.parse(new TextDecoder().decode(files["manifest.json"]));
    images = manifest.images.map((entry, index) => ({
      blob: new Blob([files[entry.file]], { type: mediaType(entry.file) }),
      seed: entry.seed ?? job.seeds[index],
      prompt: entry.prompt || info.prompt || "",
    }));
    if (info.batch) {
      const link = $("batch-download");
      if (state.batchUrl) URL.revokeObjectURL(state.batchUrl);
      state.batchUrl = URL.createObjectURL(blob);
      link.href = state.batchUrl;
      link.download = `sdxl-batch-${job.id}.zip`;
      link.textContent = `Download ZIP (${images.length} images)`;
      link.hidden = false;
    }
  } else {
    images = [{ blob, seed: job.seeds[0], prompt: info.prompt || "" }];
  }
  for (const image of images.reverse()) addToGallery(image, job.id);
}

function mediaType(name) {
  const extension = name.split(".").pop().toLowerCase();
  return { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", webp: "image/webp" }[extension] || "application/octet-stream";
}

function addToGallery({ blob, seed, prompt }, jobId) {
  const url = URL.createObjectURL(blob);
  const extension = { "image/jpeg": "jpg", "image/webp": "webp" }[blob.type] || "png";
  const item = element("li");
  item.dataset.seed = String(seed);
  item.dataset.job = jobId;
  const figure = element("figure");
  const image = element("img", { src: url, alt: `${prompt} (seed ${seed})` });
  const caption = element("figcaption");
  const seedText = element("span", { class: "seed" }, "Seed ");
  seedText.append(element("code", {}, String(seed)));
  const reuse = element("button", { type: "button", class: "reuse-seed" }, "Use seed");
  reuse.setAttribute("aria-label", `Use seed ${seed}`);
  reuse.addEventListener("click", () => {
    $("seed").value = String(seed);
    $("seed").focus();
  });
  const download = element("a", { class: "button download", href: url, download: `sdxl-${seed}.${extension}` }, "Download");
  download.setAttribute("aria-label", `Download the image of seed ${seed}`);
  caption.append(seedText, reuse, download, element("span", { class: "prompt" }, prompt));
  figure.append(image, caption);
  item.append(figure);
  $("gallery").prepend(item);
}

async function unzip(blob) {
  // The results' ZIPs hold their files stored (or deflated): read the central directory.
  const bytes = new Uint8Array(await blob.arrayBuffer());
  const view = new DataView(bytes.buffer);
  let end = -1;
  for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 65557); i--) {
    if (view.getUint32(i, true) === 0x06054b50) {
      end = i;
      break;
    }
  }
  if (end < 0) throw new Error("the result is not a ZIP");
  const count = view.getUint16(end + 10, true);
  let at = view.getUint32(end + 16, true);
  const files = {};
  for (let k = 0; k < count; k++) {
    if (view.getUint32(at, true) !== 0x02014b50) throw new Error("the ZIP's directory is broken");
    const method = view.getUint16(at + 10, true);
    const size = view.getUint32(at + 20, true);
    const nameLength = view.getUint16(at + 28, true);
    const extraLength = view.getUint16(at + 30, true);
    const commentLength = view.getUint16(at + 32, true);
    const local = view.getUint32(at + 42, true);
    const name = new TextDecoder().decode(bytes.subarray(at + 46, at + 46 + nameLength));
    const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    let data = bytes.subarray(start, start + size);
    if (method === 8) {
      const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
      data = new Uint8Array(await new Response(stream).arrayBuffer());
    } else if (method !== 0) {
      throw new Error(`the ZIP uses compression ${method}`);
    }
    files[name] = data;
    at += 46 + nameLength + extraLength + commentLength;
  }
  return files;
}

function element(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

init().catch((error) => {
  $("server-status").textContent = `The playground could not start: ${error.message}`;
  $("server-status").classList.add("bad");
});
