// The studio page: regions drawn on a canvas (boxes kept as fractions of the image, snapped to its pixels), the
// layout document sent to the server (which checks it with load_layout), sampling jobs polled until done.
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
  regions: [], // {x0, y0, x1, y1 (fractions), prompt, negative, adapterWeight (text as typed)}
  selected: -1,
  drag: null, // {mode: "new" | "move" | "resize", start, origin, anchor}
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

function colour(index, alpha) {
  const palette = state.info ? state.info.palette : [[230, 25, 75]];
  const [r, g, b] = palette[index % palette.length];
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
    const x = region.x0 * w;
    const y = region.y0 * h;
    const bw = (region.x1 - region.x0) * w;
    const bh = (region.y1 - region.y0) * h;
    context.fillStyle = colour(index, TINT);
    context.fillRect(x, y, bw, bh);
    context.lineWidth = index === state.selected ? 4 : 2;
    context.strokeStyle = colour(index, 1);
    context.strokeRect(x + 1, y + 1, bw - 2, bh - 2);
    const label = `${index}: ${(region.prompt || "").replace(/\s+/g, " ")}`;
    const text = fitText(label, bw - 8);
    const tw = context.measureText(text).width;
    context.fillStyle = colour(index, 1);
    context.fillRect(x + 3, y + 3, tw + 4, 18);
    context.fillStyle = "#fff";
    context.fillText(text, x + 5, y + 5);
    if (index === state.selected) {
      context.fillStyle = "#fff";
      for (const [cx, cy] of [[x, y], [x + bw, y], [x, y + bh], [x + bw, y + bh]]) {
        context.fillRect(cx - 4, cy - 4, 8, 8);
        context.strokeRect(cx - 4, cy - 4, 8, 8);
      }
    }
  });
}

function fitText(text, room) {
  while (text.length > 4 && context.measureText(text).width > room) text = text.slice(0, -4) + "...";
  return text;
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
    item.querySelector(".region-box").textContent = `[${pixels(region).join(", ")}] px`;
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
}

function select(index, rerender = true) {
  if (state.selected === index) return;
  state.selected = index;
  document.querySelectorAll("#regions .region").forEach((item, i) => item.classList.toggle("selected", i === index));
  $("delete-region").disabled = index < 0;
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
    for (const [cx, cy, ax, ay] of [[r.x0, r.y0, r.x1, r.y1], [r.x1, r.y0, r.x0, r.y1], [r.x0, r.y1, r.x1, r.y0],
      [r.x1, r.y1, r.x0, r.y0]]) {
      if (Math.abs(point.raw.x - cx) <= nearX && Math.abs(point.raw.y - cy) <= nearY) {
        return { index: i, mode: "resize", anchor: { x: ax, y: ay } };
      }
    }
  }
  for (let i = state.regions.length - 1; i >= 0; i--) {
    const r = state.regions[i];
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
  const target = hit(point);
  if (target) {
    select(target.index);
    const region = state.regions[target.index];
    state.drag = { mode: target.mode, start: point, anchor: target.anchor, origin: { ...region } };
  } else {
    select(-1);
    state.drag = { mode: "new", start: point, box: null };
  }
});

window.addEventListener("mousemove", (event) => {
  const drag = state.drag;
  if (!drag) return;
  const point = pointer(event);
  if (drag.mode === "new") {
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
      state.regions.push({ ...drag.box, prompt: "", negative: "", adapterWeight: "1" });
      state.selected = state.regions.length - 1;
      renderRegions();
      draw();
      document.querySelectorAll("#regions .region-prompt")[state.selected].focus();
      return;
    }
  } else if (!big(state.regions[state.selected])) {
    Object.assign(state.regions[state.selected], drag.origin); // a resize that left no pixel: undone
  }
  renderRegions();
  draw();
});

canvas.addEventListener("keydown", (event) => {
  if ((event.key === "Delete" || event.key === "Backspace") && state.selected >= 0) {
    event.preventDefault();
    removeRegion(state.selected);
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

// The layout as JSON text: what load_layout reads, boxes as fractions (every value <= 1). A seed keeps all its
// digits (a JavaScript number would round one above 2**53).
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
  document_.regions = state.regions.map((r) => {
    const region = { prompt: r.prompt };
    if (r.negative.trim() !== "") region.negative_prompt = r.negative;
    region.box = [r.x0, r.y0, r.x1, r.y1];
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
  const kept = data.layout.conditions.map((c) => `\nIts condition image, ${c.image}, is kept while the studio runs: `
    + "copy it and change the path in the file to keep it.").join("");
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
$("clear-regions").addEventListener("click", () => { state.regions = []; state.selected = -1; renderRegions(); draw(); });

for (const id of ["width", "height"]) {
  $(id).addEventListener("change", () => {
    const { width, height } = imageSize(); // boxes stay where they are, snapped to the new pixel grid
    for (const r of state.regions) {
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
