// The studio page: regions drawn on a canvas (boxes kept as fractions of the image, snapped to its pixels, or masks
// painted at the image's size), the layout document sent to the server (which checks it with load_layout), sampling
// jobs polled until done.
"use strict";

const DISPLAY = 512; // the canvas's longer side on screen, in CSS pixels
const HANDLE = 8; // how near a corner (CSS pixels) a drag resizes instead of moving
const POLL_MS = 250;
const TINT = 56 / 255; // region fill opacity, as layout.TINT_ALPHA

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const context = canvas.getContext("2d");

const state = {
  info: null,
  regions: [], // {kind: "box" | "mask", x0, y0, x1, y1 (fractions), mask, prompt, negative, adapterWeight (as typed)}
  selected: -1,
  drag: null, // {mode: "new" | "move" | "resize" | "paint", start, origin, anchor, last}
  hover: null, // the pointer over the canvas (fractions) while painting: where the brush outline is drawn
  background: null, // an HTMLImageElement
  backgroundURL: null, // its data URL, sent for the server preview and as the condition image
  job: null,
  timer: null,
};

// -- sizes and coordinates ---------------------------------------------------------------------------------------

function imageSize() {
  const width = parseInt($("width").value, 10);
  const height = parseInt($("height").value, 10);
  const ok = (v) => Number.isFinite(v) && v >= 8 && v <= 16384;
  return { width: ok(width) ? width : state.info.width, height: ok(height) ? height : state.info.height };
}

function fitCanvas() {
  const { width, height } = imageSize();
  const scale = DISPLAY / Math.max(width, height);
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  draw();
}

// The pointer as fractions of the image, snapped to its pixel grid and clamped inside it.
function pointer(event) {
  const rect = canvas.getBoundingClientRect(); // its border box; the image fills the client (content) box
  const { width, height } = imageSize();
  const fx = Math.min(1, Math.max(0, (event.clientX - rect.left - canvas.clientLeft) / canvas.clientWidth));
  const fy = Math.min(1, Math.max(0, (event.clientY - rect.top - canvas.clientTop) / canvas.clientHeight));
  return { x: Math.round(fx * width) / width, y: Math.round(fy * height) / height, raw: { x: fx, y: fy } };
}

function snap(value, size) {
  return Math.round(value * size) / size;
}

function pixels(region) {
  const { width, height } = imageSize();
  return [region.x0 * width, region.y0 * height, region.x1 * width, region.y1 * height].map(Math.round);
}

// -- drawing ---------------------------------------------------------------------------------------------------

function rgb(index) {
  const palette = state.info ? state.info.palette : [[230, 25, 75]];
  return palette[index % palette.length];
}

function colour(index, alpha) {
  const [r, g, b] = rgb(index);
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

function draw() {
  const w = canvas.width;
  const h = canvas.height;
  context.clearRect(0, 0, w, h);
  if (state.background) {
    context.drawImage(state.background, 0, 0, w, h);
  } else {
    context.fillStyle = "rgb(128, 128, 128)";
    context.fillRect(0, 0, w, h);
  }
  const regions = state.regions.slice();
  if (state.drag && state.drag.mode === "new" && state.drag.box) regions.push(state.drag.box);
  context.font = "14px system-ui, sans-serif";
  context.textBaseline = "top";
  regions.forEach((region, index) => {
    if (region.kind === "mask") {
      drawMask(region.mask, index, index === state.selected);
      const bounds = maskBounds(region.mask);
      const sx = w / region.mask.width;
      const sy = h / region.mask.height;
      if (bounds) drawLabel(region, index, bounds[0] * sx, bounds[1] * sy, (bounds[2] - bounds[0]) * sx);
      return;
    }
    const x = region.x0 * w;
    const y = region.y0 * h;
    const bw = (region.x1 - region.x0) * w;
    const bh = (region.y1 - region.y0) * h;
    context.fillStyle = colour(index, TINT);
    context.fillRect(x, y, bw, bh);
    context.lineWidth = index === state.selected ? 4 : 2;
    context.strokeStyle = colour(index, 1);
    context.strokeRect(x + 1, y + 1, bw - 2, bh - 2);
    drawLabel(region, index, x, y, bw);
    if (index === state.selected) {
      context.fillStyle = "#fff";
      for (const [cx, cy] of [[x, y], [x + bw, y], [x, y + bh], [x + bw, y + bh]]) {
        context.fillRect(cx - 4, cy - 4, 8, 8);
        context.strokeRect(cx - 4, cy - 4, 8, 8);
      }
    }
  });
  if (paintingRegion() && state.hover) { // the brush's outline, dark and light to show on any background
    const radius = ($("brush-size").value / 2) * (w / canvas.clientWidth);
    context.lineWidth = 1;
    for (const [r, style] of [[radius, "#000"], [radius + 1, "#fff"]]) {
      context.beginPath();
      context.arc(state.hover.x * w, state.hover.y * h, r, 0, 2 * Math.PI);
      context.strokeStyle = style;
      context.stroke();
    }
  }
}

// The region's number and prompt on a strip of its colour at (x, y), shortened to `room` pixels.
function drawLabel(region, index, x, y, room) {
  const label = `${index}: ${(region.prompt || "").replace(/\s+/g, " ")}`;
  const text = fitText(label, room - 8);
  const tw = context.measureText(text).width;
  context.fillStyle = colour(index, 1);
  context.fillRect(x + 3, y + 3, tw + 4, 18);
  context.fillStyle = "#fff";
  context.fillText(text, x + 5, y + 5);
}

function fitText(text, room) {
  while (text.length > 4 && context.measureText(text).width > room) text = text.slice(0, -4) + "...";
  return text;
}

// -- masks -----------------------------------------------------------------------------------------------------
// A painted mask holds one byte per image pixel (1: inside the region), at the layout's size; it is drawn scaled
// onto the canvas and sent as a black and white PNG. The brush is sized in screen pixels.

const scratch = document.createElement("canvas"); // one mask at image size, before it is scaled or encoded

function newMask(width, height) {
  return { width, height, cells: new Uint8Array(width * height) };
}

// The region's box as a mask: a region switched to "mask" starts from its box.
function maskFromBox(region) {
  const { width, height } = imageSize();
  const mask = newMask(width, height);
  const [x0, y0, x1, y1] = pixels(region);
  for (let y = y0; y < y1; y++) mask.cells.fill(1, y * width + x0, y * width + x1);
  return mask;
}

// The mask at another size, each pixel taken from the nearest one of the old size.
function resizeMask(mask, width, height) {
  if (mask.width === width && mask.height === height) return mask;
  const resized = newMask(width, height);
  for (let y = 0; y < height; y++) {
    const sy = Math.min(mask.height - 1, Math.floor(((y + 0.5) * mask.height) / height));
    for (let x = 0; x < width; x++) {
      const sx = Math.min(mask.width - 1, Math.floor(((x + 0.5) * mask.width) / width));
      resized.cells[y * width + x] = mask.cells[sy * mask.width + sx];
    }
  }
  return resized;
}

// [x0, y0, x1, y1] in pixels around the mask's inside, or null when it is empty.
function maskBounds(mask) {
  let [x0, y0, x1, y1] = [mask.width, mask.height, 0, 0];
  for (let y = 0; y < mask.height; y++) {
    for (let x = 0; x < mask.width; x++) {
      if (!mask.cells[y * mask.width + x]) continue;
      x0 = Math.min(x0, x);
      y0 = Math.min(y0, y);
      x1 = Math.max(x1, x + 1);
      y1 = Math.max(y1, y + 1);
    }
  }
  return x1 > x0 ? [x0, y0, x1, y1] : null;
}

function maskAt(mask, raw) {
  const x = Math.min(mask.width - 1, Math.floor(raw.x * mask.width));
  const y = Math.min(mask.height - 1, Math.floor(raw.y * mask.height));
  return mask.cells[y * mask.width + x] === 1;
}

// Set the pixels within `radius` of the segment a-b (image pixels) to `value`, and always the one under each stamp.
function paintSegment(mask, a, b, radius, value) {
  const steps = Math.max(1, Math.ceil(Math.hypot(b.x - a.x, b.y - a.y) / Math.max(0.5, radius / 2)));
  for (let step = 0; step <= steps; step++) {
    const cx = a.x + ((b.x - a.x) * step) / steps;
    const cy = a.y + ((b.y - a.y) * step) / steps;
    const under = Math.min(mask.height - 1, Math.floor(cy)) * mask.width + Math.min(mask.width - 1, Math.floor(cx));
    mask.cells[under] = value;
    const top = Math.min(mask.height, Math.ceil(cy + radius));
    const right = Math.min(mask.width, Math.ceil(cx + radius));
    for (let y = Math.max(0, Math.floor(cy - radius)); y < top; y++) {
      for (let x = Math.max(0, Math.floor(cx - radius)); x < right; x++) {
        if ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= radius ** 2) mask.cells[y * mask.width + x] = value;
      }
    }
  }
}

const UNDO_STEPS = 30; // strokes (and clears) of a mask that Undo can take back

// A copy of the region's mask, kept before a stroke or a clear changes it, for Undo.
function rememberMask(region) {
  const { width, height, cells } = region.mask;
  region.undo = [...(region.undo || []), { width, height, cells: cells.slice() }].slice(-UNDO_STEPS);
  $("undo-mask").disabled = false;
}

// The painted region's mask as it was before its last stroke or clear.
function undoMask() {
  const region = paintingRegion();
  if (!region || !region.undo || !region.undo.length) return;
  region.mask = region.undo.pop();
  $("undo-mask").disabled = region.undo.length === 0;
  renderRegions();
  draw();
}

// The brush (or eraser) stroke from one pointer position to the next on the selected mask region.
function paint(region, from, to) {
  const mask = region.mask;
  const radius = ($("brush-size").value / 2) * (mask.width / canvas.clientWidth);
  const value = document.querySelector("input[name=tool]:checked").value === "brush" ? 1 : 0;
  const at = (point) => ({ x: point.raw.x * mask.width, y: point.raw.y * mask.height });
  paintSegment(mask, at(from), at(to), radius, value);
}

// The mask's inside tinted in the region's colour and outlined along its pixels' sides, as boxes are drawn.
function drawMask(mask, index, selected) {
  const { width, height, cells } = mask;
  scratch.width = width;
  scratch.height = height;
  const g = scratch.getContext("2d");
  const image = g.createImageData(width, height);
  const tint = [...rgb(index), Math.round((selected ? 2 : 1) * TINT * 255)];
  cells.forEach((cell, i) => { if (cell) image.data.set(tint, 4 * i); });
  g.putImageData(image, 0, 0);
  context.imageSmoothingEnabled = false; // the image's pixels as squares, as the model sees them
  context.drawImage(scratch, 0, 0, canvas.width, canvas.height);
  context.imageSmoothingEnabled = true;
  const sx = canvas.width / width;
  const sy = canvas.height / height;
  const inside = (x, y) => x >= 0 && y >= 0 && x < width && y < height && cells[y * width + x] === 1;
  context.beginPath();
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!inside(x, y)) continue;
      for (const [dx, dy, ax, ay, bx, by] of [[-1, 0, 0, 0, 0, 1], [1, 0, 1, 0, 1, 1], [0, -1, 0, 0, 1, 0],
        [0, 1, 0, 1, 1, 1]]) {
        if (inside(x + dx, y + dy)) continue;
        context.moveTo((x + ax) * sx, (y + ay) * sy);
        context.lineTo((x + bx) * sx, (y + by) * sy);
      }
    }
  }
  context.lineWidth = selected ? 4 : 2;
  context.strokeStyle = colour(index, 1);
  context.stroke();
}

// The mask as the layout's mask file: a PNG data URL, white inside, black outside, at the layout's size.
function maskURL(mask) {
  const { width, height } = imageSize();
  const { cells } = resizeMask(mask, width, height);
  scratch.width = width;
  scratch.height = height;
  const g = scratch.getContext("2d");
  const image = g.createImageData(width, height);
  cells.forEach((cell, i) => image.data.set([255 * cell, 255 * cell, 255 * cell, 255], 4 * i));
  g.putImageData(image, 0, 0);
  return scratch.toDataURL("image/png");
}

// The selected region while it is a mask: the canvas paints it instead of drawing boxes.
function paintingRegion() {
  const region = state.regions[state.selected];
  return region && region.kind === "mask" ? region : null;
}

function showMaskTools() {
  const painting = paintingRegion() !== null;
  $("mask-tools").classList.toggle("hidden", !painting);
  $("mask-name").textContent = painting ? `Painting region ${state.selected}:` : "";
  $("undo-mask").disabled = !painting || !(paintingRegion().undo || []).length;
  if (!painting) state.hover = null;
}

// A box region becomes a mask of its box; a mask region becomes the box around its mask (or keeps its last box).
function setKind(index, kind) {
  const region = state.regions[index];
  if (region.kind === kind) return;
  region.undo = []; // strokes belong to the mask they were made on
  if (kind === "mask") {
    region.mask = maskFromBox(region);
  } else {
    const bounds = maskBounds(region.mask);
    const { width, height } = region.mask;
    if (bounds) Object.assign(region, { x0: bounds[0] / width, y0: bounds[1] / height, x1: bounds[2] / width,
      y1: bounds[3] / height });
    region.mask = null;
  }
  region.kind = kind;
  state.selected = index;
  renderRegions();
  draw();
}

function regionSize(region) {
  if (region.kind === "box") return `[${pixels(region).join(", ")}] px`;
  const count = region.mask.cells.reduce((sum, cell) => sum + cell, 0);
  return count ? `mask, ${count} px` : "mask, empty: paint it";
}

// -- the region list -------------------------------------------------------------------------------------------

function renderRegions() {
  const list = $("regions");
  list.replaceChildren();
  state.regions.forEach((region, index) => {
    const item = $("region-template").content.firstElementChild.cloneNode(true);
    item.style.borderLeftColor = colour(index, 1);
    item.classList.toggle("selected", index === state.selected);
    item.querySelector(".swatch").style.background = colour(index, 1);
    item.querySelector(".region-name").textContent = `Region ${index}`;
    const kind = item.querySelector(".region-kind");
    kind.value = region.kind;
    kind.addEventListener("change", () => setKind(index, kind.value));
    item.querySelector(".region-box").textContent = regionSize(region);
    const prompt = item.querySelector(".region-prompt");
    prompt.value = region.prompt;
    prompt.addEventListener("input", () => { region.prompt = prompt.value; draw(); });
    prompt.addEventListener("focus", () => select(index, false));
    const negative = item.querySelector(".region-negative");
    negative.value = region.negative;
    negative.addEventListener("input", () => { region.negative = negative.value; });
    negative.addEventListener("focus", () => select(index, false));
    const weight = item.querySelector(".region-adapter-weight");
    weight.value = region.adapterWeight;
    weight.addEventListener("input", () => { region.adapterWeight = weight.value; });
    weight.addEventListener("focus", () => select(index, false));
    item.querySelector(".region-weight").classList.toggle("hidden", !usingCondition());
    item.querySelector(".region-delete").addEventListener("click", () => removeRegion(index));
    list.appendChild(item);
  });
  $("no-regions").classList.toggle("hidden", state.regions.length > 0);
  $("delete-region").disabled = state.selected < 0;
  showMaskTools();
}

function select(index, rerender = true) {
  if (state.selected === index) return;
  state.selected = index;
  document.querySelectorAll("#regions .region").forEach((item, i) => item.classList.toggle("selected", i === index));
  $("delete-region").disabled = index < 0;
  showMaskTools();
  if (rerender) renderRegions();
  draw();
}

function removeRegion(index) {
  state.regions.splice(index, 1);
  state.selected = -1;
  renderRegions();
  draw();
}

// -- mouse -----------------------------------------------------------------------------------------------------

function hit(point) {
  const nearX = HANDLE / canvas.clientWidth;
  const nearY = HANDLE / canvas.clientHeight;
  for (let i = state.regions.length - 1; i >= 0; i--) {
    const r = state.regions[i];
    if (r.kind === "mask") continue;
    for (const [cx, cy, ax, ay] of [[r.x0, r.y0, r.x1, r.y1], [r.x1, r.y0, r.x0, r.y1], [r.x0, r.y1, r.x1, r.y0],
      [r.x1, r.y1, r.x0, r.y0]]) {
      if (Math.abs(point.raw.x - cx) <= nearX && Math.abs(point.raw.y - cy) <= nearY) {
        return { index: i, mode: "resize", anchor: { x: ax, y: ay } };
      }
    }
  }
  for (let i = state.regions.length - 1; i >= 0; i--) {
    const r = state.regions[i];
    if (r.kind === "mask") {
      if (maskAt(r.mask, point.raw)) return { index: i, mode: "select" };
      continue;
    }
    if (point.raw.x >= r.x0 && point.raw.x <= r.x1 && point.raw.y >= r.y0 && point.raw.y <= r.y1) {
      return { index: i, mode: "move" };
    }
  }
  return null;
}

function boxFrom(a, b) {
  return { x0: Math.min(a.x, b.x), y0: Math.min(a.y, b.y), x1: Math.max(a.x, b.x), y1: Math.max(a.y, b.y) };
}

canvas.addEventListener("mousedown", (event) => {
  if (event.button !== 0 || !state.info) return;
  event.preventDefault();
  canvas.focus();
  const point = pointer(event);
  const painting = paintingRegion();
  if (painting) {
    state.drag = { mode: "paint", last: point };
    rememberMask(painting);
    paint(painting, point, point);
    draw();
    return;
  }
  const target = hit(point);
  if (target) {
    select(target.index);
    if (target.mode === "select") return; // a mask region: selected, so the next drag paints it
    const region = state.regions[target.index];
    state.drag = { mode: target.mode, start: point, anchor: target.anchor, origin: { ...region } };
  } else {
    select(-1);
    state.drag = { mode: "new", start: point, box: null };
  }
});

window.addEventListener("mousemove", (event) => {
  const drag = state.drag;
  const painting = paintingRegion();
  if (painting) state.hover = event.target === canvas ? pointer(event).raw : null;
  if (!drag) {
    if (painting) draw();
    return;
  }
  const point = pointer(event);
  if (drag.mode === "paint") {
    paint(painting, drag.last, point);
    drag.last = point;
  } else if (drag.mode === "new") {
    drag.box = { ...boxFrom(drag.start, point), prompt: "" };
  } else if (drag.mode === "resize") {
    Object.assign(state.regions[state.selected], boxFrom(drag.anchor, point));
  } else {
    const { width, height } = imageSize();
    const o = drag.origin;
    const dx = Math.min(1 - o.x1, Math.max(-o.x0, point.x - drag.start.x));
    const dy = Math.min(1 - o.y1, Math.max(-o.y0, point.y - drag.start.y));
    Object.assign(state.regions[state.selected], { x0: snap(o.x0 + dx, width), x1: snap(o.x1 + dx, width),
      y0: snap(o.y0 + dy, height), y1: snap(o.y1 + dy, height) });
  }
  draw();
});

window.addEventListener("mouseup", () => {
  const drag = state.drag;
  if (!drag) return;
  state.drag = null;
  const { width, height } = imageSize();
  const big = (r) => Math.round((r.x1 - r.x0) * width) >= 1 && Math.round((r.y1 - r.y0) * height) >= 1;
  if (drag.mode === "new") {
    if (drag.box && big(drag.box)) {
      state.regions.push({ ...drag.box, kind: "box", mask: null, prompt: "", negative: "", adapterWeight: "1" });
      state.selected = state.regions.length - 1;
      renderRegions();
      draw();
      document.querySelectorAll("#regions .region-prompt")[state.selected].focus();
      return;
    }
  } else if (drag.mode !== "paint" && !big(state.regions[state.selected])) {
    Object.assign(state.regions[state.selected], drag.origin); // a resize that left no pixel: undone
  }
  renderRegions();
  draw();
});

canvas.addEventListener("mouseleave", () => {
  if (state.hover) {
    state.hover = null;
    draw();
  }
});

canvas.addEventListener("keydown", (event) => {
  if ((event.key === "Delete" || event.key === "Backspace") && state.selected >= 0) {
    event.preventDefault();
    removeRegion(state.selected);
  } else if (event.key === "Escape") {
    select(-1);
  } else if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z" && paintingRegion()) {
    event.preventDefault();
    undoMask();
  }
});

// -- the layout document ---------------------------------------------------------------------------------------

// A number field's value: a number when it reads as one, else the text as typed, so the server's check names it.
function numberField(id) {
  return numberValue($(id).value);
}

function numberValue(typed) {
  const text = String(typed).trim();
  const value = Number(text);
  return text !== "" && Number.isFinite(value) ? value : text;
}

function usingCondition() {
  return $("use-condition").checked && state.backgroundURL !== null;
}

// The layout as JSON text: what load_layout reads, boxes as fractions (every value <= 1), masks as PNG data URLs
// (the server saves them as files). A seed keeps all its digits (a JavaScript number would round one above 2**53).
function layoutJSON(extra = {}) {
  const document_ = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width: numberField("width"),
    height: numberField("height"),
    steps: numberField("steps"),
    guidance: numberField("guidance"),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") document_.seed = /^\d+$/.test(seed) ? "@SEED@" : seed;
  if ($("scheduler").value) document_.scheduler = $("scheduler").value;
  if ($("isolate").checked) document_.isolate_regions = true;
  document_.regions = state.regions.map((r) => {
    const region = { prompt: r.prompt };
    if (r.negative.trim() !== "") region.negative_prompt = r.negative;
    if (r.kind === "mask") region.mask = maskURL(r.mask);
    else region.box = [r.x0, r.y0, r.x1, r.y1];
    if (usingCondition() && numberValue(r.adapterWeight) !== 1) region.adapter_weight = numberValue(r.adapterWeight);
    return region;
  });
  if (usingCondition()) {
    // The server saves the image at the layout's size and names that file in the layout
    document_.conditions = [{ type: $("condition-type").value, model: $("condition-model").value.trim(),
      weight: numberField("condition-weight"), image: state.backgroundURL }];
  }
  const text = JSON.stringify({ layout: document_, ...extra });
  return /^\d+$/.test(seed) ? text.replace('"@SEED@"', seed) : text;
}

async function api(path, body) {
  const options = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body };
  const response = await fetch(path, options);
  const type = response.headers.get("Content-Type") || "";
  if (type.startsWith("application/json")) {
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  }
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  return response.blob();
}

function say(text, kind = "info") {
  const message = $("message");
  message.textContent = text;
  message.className = kind;
}

async function check() {
  const data = await api("/api/check", layoutJSON());
  $("yaml").textContent = data.yaml;
  const link = $("save-layout-link");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([data.yaml], { type: "application/yaml" }));
  link.classList.remove("hidden");
  return data;
}

async function guarded(action) {
  try {
    await action();
  } catch (error) {
    say(error.message, "error");
  }
}

$("check").addEventListener("click", () => guarded(async () => {
  const data = await check();
  say(`The layout is valid: ${data.layout.regions.length} region(s), ${data.layout.width} x ${data.layout.height}.`);
}));

$("save-layout").addEventListener("click", () => guarded(async () => {
  const data = await check();
  $("save-layout-link").click();
  const files = [...data.layout.conditions.map((c) => c.image), ...data.layout.regions.flatMap((r) => r.mask || [])];
  const kept = files.length ? `\nIts images (${files.join(", ")}) are kept while the studio runs: copy them and `
    + "change the paths in the file to keep them." : "";
  say(`Saved layout.yaml: sample it with  mixofshow sample --model ... --layout layout.yaml${kept}`);
}));

$("preview-button").addEventListener("click", () => guarded(async () => {
  const extra = state.backgroundURL ? { background: state.backgroundURL } : {};
  const blob = await api("/api/preview", layoutJSON(extra));
  const image = $("preview");
  if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(blob);
  say("Preview drawn by the server.");
}));

// -- generating ------------------------------------------------------------------------------------------------

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(async () => {
    const job = await api("/api/generate", layoutJSON());
    say(`Generating ${job.width} x ${job.height}, seed ${job.seed}...`);
    $("download-image").classList.add("hidden");
    $("download-layout").classList.add("hidden");
    $("generate").disabled = true;
    $("cancel").disabled = false;
    state.job = job;
    show(job);
    poll();
  });
});

$("cancel").addEventListener("click", () => guarded(async () => {
  if (state.job) await api(`/api/jobs/${state.job.id}/cancel`, "{}");
}));

function show(job) {
  const progress = $("progress");
  progress.max = Math.max(1, job.total);
  progress.value = job.step;
  const words = { running: `step ${job.step} / ${job.total}`, done: "done", error: "failed", cancelled: "cancelled" };
  $("job-status").textContent = `job ${job.id}: ${words[job.state] || job.state} (${job.seconds.toFixed(1)} s)`;
}

function poll() {
  clearTimeout(state.timer);
  state.timer = setTimeout(() => guarded(async () => {
    const job = await api(`/api/jobs/${state.job.id}`);
    state.job = job;
    show(job);
    if (job.state === "running") {
      poll();
      return;
    }
    $("generate").disabled = false;
    $("cancel").disabled = true;
    if (job.state === "done") {
      $("result").src = `${job.image}?job=${job.id}`;
      const image = $("download-image");
      image.href = job.image;
      image.download = `mixofshow-seed${job.seed}.png`;
      image.classList.remove("hidden");
      $("download-layout").href = job.layout;
      $("download-layout").classList.remove("hidden");
      $("yaml").textContent = await (await api(job.layout)).text();
      say(`Done in ${job.seconds.toFixed(1)} s (seed ${job.seed}).`);
    } else if (job.state === "error") {
      say(job.error, "error");
    } else {
      say("Cancelled.");
    }
  }), POLL_MS);
}

// -- background and size ---------------------------------------------------------------------------------------

$("background").addEventListener("change", () => {
  const file = $("background").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const image = new Image();
    image.onload = () => {
      state.background = image;
      state.backgroundURL = reader.result;
      $("background-size").disabled = false;
      $("clear-background").disabled = false;
      $("use-condition").disabled = false;
      showCondition();
      draw();
    };
    image.onerror = () => say(`${file.name} is not an image the browser can read.`, "error");
    image.src = reader.result;
  };
  reader.readAsDataURL(file);
});

$("background-size").addEventListener("click", () => {
  const image = state.background;
  if (!image) return;
  $("width").value = Math.max(8, image.naturalWidth - (image.naturalWidth % 8));
  $("height").value = Math.max(8, image.naturalHeight - (image.naturalHeight % 8));
  fitCanvas();
  renderRegions();
});

$("clear-background").addEventListener("click", () => {
  state.background = null;
  state.backgroundURL = null;
  $("background").value = "";
  $("background-size").disabled = true;
  $("clear-background").disabled = true;
  $("use-condition").disabled = true;
  showCondition();
  draw();
});

// The condition's settings and each region's condition weight show while the background is the condition.
function showCondition() {
  $("condition").classList.toggle("hidden", !usingCondition());
  renderRegions();
}

$("use-condition").addEventListener("change", showCondition);

$("delete-region").addEventListener("click", () => { if (state.selected >= 0) removeRegion(state.selected); });
$("done-painting").addEventListener("click", () => select(-1));
$("undo-mask").addEventListener("click", undoMask);
$("clear-mask").addEventListener("click", () => {
  const region = paintingRegion();
  if (!region) return;
  rememberMask(region);
  region.mask.cells.fill(0);
  renderRegions();
  draw();
});
$("clear-regions").addEventListener("click", () => { state.regions = []; state.selected = -1; renderRegions(); draw(); });

for (const id of ["width", "height"]) {
  $(id).addEventListener("change", () => {
    const { width, height } = imageSize(); // boxes stay where they are, snapped to the new grid; masks resampled
    for (const r of state.regions) {
      if (r.mask) r.mask = resizeMask(r.mask, width, height);
      Object.assign(r, { x0: snap(r.x0, width), x1: snap(r.x1, width), y0: snap(r.y0, height), y1: snap(r.y1, height) });
      if (r.x1 <= r.x0) r.x1 = Math.min(1, r.x0 + 1 / width);
      if (r.y1 <= r.y0) r.y1 = Math.min(1, r.y0 + 1 / height);
    }
    fitCanvas();
    renderRegions();
  });
}

// -- start -----------------------------------------------------------------------------------------------------

guarded(async () => {
  const info = await api("/api/info");
  state.info = info;
  $("model").textContent = `model: ${info.source}  |  concepts: ${info.concepts.join(" ") || "none"}`;
  $("width").value = info.width;
  $("height").value = info.height;
  $("steps").value = info.steps;
  $("guidance").value = info.guidance;
  for (const name of info.schedulers) $("scheduler").add(new Option(name, name));
  for (const name of info.condition_types) $("condition-type").add(new Option(name, name));
  fitCanvas();
  renderRegions();
  $("status").textContent = "ready";
});
