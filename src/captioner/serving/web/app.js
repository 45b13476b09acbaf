// captioner's web page: choose or drop a photo, read its caption, hover or tap a word to see
// where the model looked, and the concepts its encoder's classifier sees. "Name what it sees" asks for
// concepts=auto (the caption names them); "Must mention" sends mention=word,word (words the caption must
// hold). Plain JavaScript, no library, no build step.
//
// The attention overlay is drawn as the figures of `captioner caption --attention` are
// (src/captioner/viz.py): the word's weights over the encoder grid, divided by their maximum,
// upsampled bicubically, blurred by a Gaussian of 0.3 grid cells, divided by their maximum again,
// coloured with the "jet" colour map and laid over the photo at 50 % opacity.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  model: null,      // GET /v1/models: models[0]
  limits: null,     // GET /v1/models: limits
  file: null,       // the chosen photo
  image: null,      // the photo, decoded by the browser (null if it cannot show it)
  result: null,     // the answer for the photo: {caption, words, attention, grid, n_best, ...}
  pinned: -1,       // the word tapped or clicked (its map stays), -1: none
  shown: -1,        // the word whose map is drawn, -1: the photo alone
  request: 0,       // counts requests, so an old answer never replaces a newer one
  sent: "",         // the options of the last request (the same photo is not sent again with the same ones)
  asked: [],        // the words the answer shown was asked to mention
};

// ---------------------------------------------------------------- the model

async function loadModel() {
  try {
    const resp = await fetch("/v1/models");
    const body = await resp.json();
    state.model = body.models[0];
    state.limits = body.limits;
  } catch (e) {
    $("model").textContent = "The server did not answer; reload the page to try again.";
    return;
  }
  const m = state.model;
  const grid = m.encoder && m.encoder.grid ? `${m.encoder.grid[0]}×${m.encoder.grid[1]}` : "";
  $("model").textContent = `Model ${m.name} · ${m.architecture} · ` +
    (m.attention ? `attention over a ${grid} grid of the photo` : "no attention over image regions");
  $("max-mb").textContent = String(Math.round(state.limits.max_upload_bytes / 1048576 * 10) / 10);
  const beam = $("beam");
  const wanted = Math.min(m.decoding.beam_size, state.limits.max_beam);
  beam.innerHTML = "";
  for (const b of [1, 2, 3, 5, 10].filter((b) => b <= state.limits.max_beam)) {
    const o = document.createElement("option");
    o.textContent = String(b);
    o.selected = b === wanted;
    beam.appendChild(o);
  }
  // "Name what it sees": on when the model's own default is concepts=auto; off and greyed out when its
  // encoder has no ImageNet classifier to see with
  const concepts = $("concepts");
  concepts.disabled = m.concepts === false;
  concepts.checked = !concepts.disabled && m.decoding.concepts === "auto";
  if (concepts.disabled) {
    $("concepts-label").title = "This model's encoder has no ImageNet classifier, so it names no concepts.";
    $("concepts-label").classList.add("disabled");
  }
}

// The request's options: beam, n-best, attention, concepts and the words to mention
function options() {
  const beam = Number($("beam").value) || 3;
  const fields = [["beam", String(beam)], ["n_best", String(Math.min(beam, 5))], ["attention", "true"]];
  if (!$("concepts").disabled) fields.push(["concepts", $("concepts").checked ? "auto" : "off"]);
  const mention = $("mention").value.trim();
  if (mention) fields.push(["mention", mention]);
  return fields;
}

function mentioned(text) {
  return text.toLowerCase().split(/[\s,]+/).filter((w) => w);
}

// ---------------------------------------------------------------- choosing a photo

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = "status" + (kind ? " " + kind : "");
  document.body.dataset.state = kind || "idle";
}

function choose(files) {
  if (!files || !files.length) return;
  const file = files[0];
  const limit = state.limits ? state.limits.max_upload_bytes : Infinity;
  if (file.size > limit) {
    setStatus(`${file.name}: ${(file.size / 1048576).toFixed(1)} MB is larger than this server's limit of ` +
              `${(limit / 1048576).toFixed(1)} MB a file; choose a smaller photo.`, "error");
    return;
  }
  state.file = file;
  caption(files.length > 1 ? ` (only the first of the ${files.length} files)` : "");
}

function decodeInBrowser(file) {
  return new Promise((resolve) => {
    const img = new Image();
    const url = URL.createObjectURL(file);
    img.onload = () => resolve(img);          // the object URL stays: the canvas redraws from it
    img.onerror = () => { URL.revokeObjectURL(url); resolve(null); };
    img.src = url;
  });
}

async function caption(note) {
  const file = state.file;
  if (!file) return;
  const id = ++state.request;
  setStatus(`Captioning ${file.name}${note || ""}…`, "busy");
  const fields = options();
  state.sent = JSON.stringify(fields);
  const form = new FormData();
  form.append("images", file, file.name);
  for (const [name, value] of fields) form.append(name, value);
  const asked = mentioned($("mention").value);
  const shown = decodeInBrowser(file);
  let resp, body;
  try {
    resp = await fetch("/v1/captions", { method: "POST", body: form });
    body = await resp.json().catch(() => null);  // every answer of the server is JSON; a proxy's may not be
  } catch (e) {
    if (id !== state.request) return;
    $("result").hidden = true;
    state.sent = "";  // the same options may be sent again
    setStatus(`The server could not be reached (${e.message}); try again.`, "error");
    return;
  }
  if (id !== state.request) return;
  if (!resp.ok) {
    $("result").hidden = true;  // the answer shown was for another photo
    state.sent = "";
    const wait = resp.headers.get("Retry-After");
    setStatus((body && body.error ? body.error : `the server answered ${resp.status}`) +
              (wait ? ` (try again in ${wait} s)` : ""), "error");
    return;
  }
  const image = await shown;
  if (id !== state.request) return;
  state.asked = asked;
  show(body.results[0], image);
}

// Caption the photo again if an option changed since it was sent
function again() {
  if (state.file && JSON.stringify(options()) !== state.sent) caption();
}

// ---------------------------------------------------------------- showing the answer

function show(result, image) {
  if (state.image && state.image !== image) URL.revokeObjectURL(state.image.src);  // the previous photo
  state.result = result;
  state.image = image;
  state.pinned = -1;
  state.shown = -1;
  const canvas = $("view");
  if (image) {
    const scale = Math.min(1, 1024 / Math.max(image.naturalWidth, image.naturalHeight));
    canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
    canvas.hidden = false;
  } else {
    canvas.hidden = true;
  }
  canvas.setAttribute("aria-label", `your photo: ${result.caption}`);

  const hasMaps = Array.isArray(result.attention) && result.attention.length === result.words.length;
  const words = $("words");
  words.innerHTML = "";
  result.words.forEach((w, k) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip" + (hasMaps && image ? "" : " plain") + (said(w, state.asked) ? " asked" : "");
    chip.textContent = w;
    chip.dataset.index = String(k);
    if (hasMaps && image) {
      chip.addEventListener("mouseenter", () => draw(k));
      chip.addEventListener("mouseleave", () => draw(state.pinned));
      chip.addEventListener("focus", () => draw(k));
      chip.addEventListener("blur", () => draw(state.pinned));
      chip.addEventListener("click", () => { state.pinned = state.pinned === k ? -1 : k; draw(state.pinned); });
    }
    words.appendChild(chip);
  });

  showConcepts(result);

  const hint = $("hint");
  hint.className = "hint";
  if (!hasMaps) {
    const arch = state.model ? state.model.architecture : "this model";
    hint.textContent = `This model (${arch}) has no attention over image regions: it sees the photo as a ` +
                       "whole, so there is no map of where it looked for each word.";
    hint.className = "hint note";
  } else if (!image) {
    hint.textContent = "Your browser cannot display this image format, so the maps cannot be drawn over it.";
    hint.className = "hint note";
  } else {
    hint.textContent = "Hover over a word, or tap it, to see where the model looked when it said it.";
  }

  const list = $("nbest");
  list.innerHTML = "";
  for (const c of result.n_best) {
    const li = document.createElement("li");
    const text = document.createElement("span");
    text.textContent = c.caption;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = c.score.toFixed(2);
    li.append(text, score);
    list.appendChild(li);
  }
  $("result").hidden = false;
  draw(-1);
  setStatus(`${result.filename}: ${result.image_size[0]}×${result.image_size[1]} pixels`, "done");
}

// Whether the caption word w says one of the words (or its plural: "cats" says "cat")
function said(w, words) {
  return words.some((c) => w === c || w === c + "s" || w === c + "es");
}

// The concepts the encoder's classifier sees, as small chips (word and confidence) under the caption;
// nothing when the model's encoder has no classifier (no "concepts" in the answer)
function showConcepts(result) {
  const seen = $("seen");
  seen.innerHTML = "";
  seen.hidden = !Array.isArray(result.concepts);
  if (seen.hidden) return;
  const span = (cls, text) => Object.assign(document.createElement("span"), { className: cls, textContent: text });
  const label = span("seen-label", "It sees");
  label.title = "What the encoder's ImageNet classifier sees in the photo, with its confidence";
  seen.appendChild(label);
  if (!result.concepts.length) seen.appendChild(span("seen-none", "nothing it is sure of"));
  for (const c of result.concepts) {
    const inCaption = result.words.some((w) => said(w, [c.word]));
    const chip = span("concept" + (inCaption ? " said" : ""), "");
    chip.title = `confidence ${c.confidence}` + (inCaption ? ", in the caption" : "");
    chip.append(span("concept-word", c.word), span("confidence", `${Math.round(c.confidence * 100)} %`));
    seen.appendChild(chip);
  }
}

function draw(k) {
  const r = state.result;
  const image = state.image;
  state.shown = k;
  for (const chip of $("words").children) chip.classList.toggle("active", Number(chip.dataset.index) === k);
  const legend = $("legend");
  if (!image) { legend.textContent = ""; return; }
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  ctx.globalAlpha = 1;
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  if (k < 0 || !r.attention) {
    legend.textContent = r.attention ? "Hover or tap a word to see its attention map here." : "";
    return;
  }
  // the region the encoder saw: the whole photo (resize "squash"), or its centre square ("center-crop")
  let x = 0, y = 0, w = canvas.width, h = canvas.height;
  if (state.model && state.model.encoder.resize === "center-crop") {
    const side = Math.min(w, h);
    x = Math.floor((w - side) / 2); y = Math.floor((h - side) / 2); w = side; h = side;
  }
  const overlay = attentionOverlay(r.attention[k], r.grid, w, h);
  ctx.globalAlpha = 0.5;
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(overlay, x, y, w, h);
  ctx.globalAlpha = 1;
  legend.innerHTML = "";
  legend.append(`Where the model looked when it said “${r.words[k]}”: least`);
  const scale = document.createElement("span");
  scale.className = "scale";
  legend.append(scale, "most.");
}

// ---------------------------------------------------------------- the attention map

// A canvas holding the coloured map of `alpha` (grid[0] rows × grid[1] columns, row-major) for a
// region of w × h pixels, computed at most 320 pixels a side (drawn scaled to the region).
function attentionOverlay(alpha, grid, w, h) {
  const scale = Math.min(1, 320 / Math.max(w, h));
  const ow = Math.max(1, Math.round(w * scale)), oh = Math.max(1, Math.round(h * scale));
  const map = attentionMap(alpha, grid, ow, oh);
  const out = document.createElement("canvas");
  out.width = ow; out.height = oh;
  const ctx = out.getContext("2d");
  const pixels = ctx.createImageData(ow, oh);
  for (let i = 0; i < map.length; i++) {
    const [r, g, b] = jet(map[i]);
    pixels.data[4 * i] = r; pixels.data[4 * i + 1] = g; pixels.data[4 * i + 2] = b; pixels.data[4 * i + 3] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
  return out;
}

// The smooth map in [0, 1] (ow × oh, row-major) of one word's weights: viz.attention_overlay_map
// with smooth=0.3, as in the figures
function attentionMap(alpha, grid, ow, oh) {
  const [H, W] = grid;
  let peak = 0;
  for (const a of alpha) peak = Math.max(peak, a);
  const cells = alpha.map((a) => a / (peak + 1e-12));
  let map = resizeBicubic(cells, W, H, ow, oh);
  for (let i = 0; i < map.length; i++) map[i] = Math.min(1, Math.max(0, map[i]));  // as the 8-bit image of viz.py
  map = gaussianBlur(map, ow, oh, 0.3 * ow / W);
  peak = 0;
  for (const v of map) peak = Math.max(peak, v);
  for (let i = 0; i < map.length; i++) map[i] /= peak + 1e-12;
  return map;
}

// Keys' cubic kernel with a = -0.5, as PIL's BICUBIC filter
function cubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

// For each output position, the input indices and normalised weights (PIL's upsampling: pixel
// centres aligned, taps outside the input dropped and the rest renormalised).
function cubicTaps(inSize, outSize) {
  const ratio = inSize / outSize;
  const support = 2 * Math.max(1, ratio);
  const filterScale = Math.max(1, ratio);
  const taps = [];
  for (let o = 0; o < outSize; o++) {
    const centre = (o + 0.5) * ratio;
    const lo = Math.max(0, Math.floor(centre - support)), hi = Math.min(inSize, Math.ceil(centre + support));
    const idx = [], wts = [];
    let sum = 0;
    for (let i = lo; i < hi; i++) {
      const wgt = cubic((i + 0.5 - centre) / filterScale);
      if (wgt !== 0) { idx.push(i); wts.push(wgt); sum += wgt; }
    }
    taps.push({ idx, wts: wts.map((v) => v / (sum || 1)) });
  }
  return taps;
}

function resizeBicubic(src, W, H, ow, oh) {
  const tx = cubicTaps(W, ow), ty = cubicTaps(H, oh);
  const rows = new Float32Array(H * ow);
  for (let r = 0; r < H; r++) {
    for (let o = 0; o < ow; o++) {
      let v = 0;
      const t = tx[o];
      for (let j = 0; j < t.idx.length; j++) v += t.wts[j] * src[r * W + t.idx[j]];
      rows[r * ow + o] = v;
    }
  }
  const out = new Float32Array(ow * oh);
  for (let o = 0; o < oh; o++) {
    const t = ty[o];
    for (let c = 0; c < ow; c++) {
      let v = 0;
      for (let j = 0; j < t.idx.length; j++) v += t.wts[j] * rows[t.idx[j] * ow + c];
      out[o * ow + c] = v;
    }
  }
  return out;
}

// Separable Gaussian blur of standard deviation sigma (pixels), edges extended
function gaussianBlur(src, w, h, sigma) {
  if (!(sigma > 0)) return src;
  const radius = Math.max(1, Math.ceil(3 * sigma));
  const kernel = new Float32Array(2 * radius + 1);
  let sum = 0;
  for (let i = -radius; i <= radius; i++) sum += (kernel[i + radius] = Math.exp(-(i * i) / (2 * sigma * sigma)));
  for (let i = 0; i < kernel.length; i++) kernel[i] /= sum;
  const tmp = new Float32Array(w * h), out = new Float32Array(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let v = 0;
      for (let i = -radius; i <= radius; i++) v += kernel[i + radius] * src[y * w + Math.min(w - 1, Math.max(0, x + i))];
      tmp[y * w + x] = v;
    }
  }
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let v = 0;
      for (let i = -radius; i <= radius; i++) v += kernel[i + radius] * tmp[Math.min(h - 1, Math.max(0, y + i)) * w + x];
      out[y * w + x] = v;
    }
  }
  return out;
}

// matplotlib's "jet" colour map (its segment data), t in [0, 1] -> [r, g, b] in 0..255
const JET = {
  r: [[0, 0], [0.35, 0], [0.66, 1], [0.89, 1], [1, 0.5]],
  g: [[0, 0], [0.125, 0], [0.375, 1], [0.64, 1], [0.91, 0], [1, 0]],
  b: [[0, 0.5], [0.11, 1], [0.34, 1], [0.65, 0], [1, 0]],
};

function segment(points, t) {
  for (let i = 1; i < points.length; i++) {
    const [x1, y1] = points[i];
    if (t <= x1) {
      const [x0, y0] = points[i - 1];
      return y0 + (y1 - y0) * (t - x0) / (x1 - x0);
    }
  }
  return points[points.length - 1][1];
}

function jet(t) {
  t = Math.min(1, Math.max(0, t));
  return [segment(JET.r, t), segment(JET.g, t), segment(JET.b, t)].map((v) => Math.round(v * 255));
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("file").addEventListener("change", (e) => { choose(e.target.files); e.target.value = ""; });
  $("beam").addEventListener("change", () => caption());
  $("concepts").addEventListener("change", () => again());
  $("mention").addEventListener("change", () => again());
  $("mention").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); again(); } });
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => { e.preventDefault(); e.stopPropagation(); choose(e.dataTransfer.files); });
  // a photo dropped anywhere else on the page is taken too, instead of the browser leaving the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer) choose(e.dataTransfer.files); });
  window.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) choose(files);
  });
}

wire();
setStatus("", "idle");
loadModel();
