// EMNet results page: comparison slider, synchronised zoom, sortable table, keyboard; #selftest loads
// the self-test driver (selftest.js) from beside the page.
// Plain browser APIs only; the data comes from the page's <script id="data" type="application/json">.
"use strict";
const pageErrors = [];
window.addEventListener("error", (e) => {
  const what = e.target && e.target !== window ? `failed to load ${e.target.src || e.target.href}` : e.message;
  pageErrors.push(what);
}, true);
window.addEventListener("unhandledrejection", (e) => pageErrors.push(`unhandled rejection: ${e.reason}`));
const consoleError = console.error.bind(console);
console.error = (...args) => { pageErrors.push(args.join(" ")); consoleError(...args); };

const DATA = JSON.parse(document.getElementById("data").textContent);
const ZOOM_BOX = 160;  // CSS pixels of each zoom pane
const $ = (id) => document.getElementById(id);
const state = {index: 0, zoom: 1, fx: 0.5, fy: 0.5, locked: false, full: {}};

function stageTitle(key) {
  return DATA.stages.find((s) => s.key === key).title;
}

function fillChoosers() {
  for (const [id, pick] of [["left", DATA.default_left], ["right", DATA.default_right]]) {
    const sel = $(id);
    for (const s of DATA.stages) sel.add(new Option(s.title, s.key, false, s.key === pick));
    sel.addEventListener("change", showCompare);
  }
}

function setSlider(value) {
  const v = Math.max(0, Math.min(100, value));
  $("slider").value = String(v);
  $("left-img").style.clipPath = `inset(0 ${100 - v}% 0 0)`;
  $("divider").style.left = `${v}%`;
}

function showCompare() {
  const img = DATA.images[state.index];
  const left = $("left").value, right = $("right").value;
  $("left-img").src = img.preview[left];
  $("right-img").src = img.preview[right];
  $("left-img").alt = `${img.name}: ${stageTitle(left)}`;
  $("right-img").alt = `${img.name}: ${stageTitle(right)}`;
  $("left-tag").textContent = stageTitle(left);
  $("right-tag").textContent = stageTitle(right);
  setSlider(Number($("slider").value));
}

function loadFull(img) {
  // Full-resolution images of the current photo only: a folder of 100 photos loads previews.
  state.full = {};
  return Promise.all(DATA.stages.map((s) => new Promise((resolve) => {
    const im = new Image();
    im.onload = () => { if (DATA.images[state.index] === img) { state.full[s.key] = im; drawZooms(); } resolve(); };
    im.onerror = () => resolve();
    im.src = img.full[s.key];
  })));
}

function zoomRegion() {
  // The source rectangle (full-resolution pixels) every zoom pane shows.
  const img = DATA.images[state.index];
  const size = Math.floor(ZOOM_BOX / state.zoom);
  const clamp = (v, hi) => Math.max(0, Math.min(hi, v));
  const sx = clamp(Math.round(state.fx * img.w - size / 2), Math.max(0, img.w - size));
  const sy = clamp(Math.round(state.fy * img.h - size / 2), Math.max(0, img.h - size));
  return {sx, sy, size: Math.min(size, img.w, img.h)};
}

function drawZooms() {
  const img = DATA.images[state.index];
  const {sx, sy, size} = zoomRegion();
  for (const s of DATA.stages) {
    const canvas = $(`zoom-${s.key}`);
    const ctx = canvas.getContext("2d", {willReadFrequently: true});  // the self-test reads it back
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const full = state.full[s.key];
    if (full) ctx.drawImage(full, sx, sy, size, size, 0, 0, size * state.zoom, size * state.zoom);
  }
  const mark = $("mark");
  Object.assign(mark.style, {left: `${100 * sx / img.w}%`, top: `${100 * sy / img.h}%`,
    width: `${100 * size / img.w}%`, height: `${100 * size / img.h}%`});
  $("zoom-where").textContent = `x ${sx}..${sx + size - 1}, y ${sy}..${sy + size - 1} at ${state.zoom === 1 ? "1:1" : "2x"}`;
}

function buildZooms() {
  for (const s of DATA.stages) {
    const fig = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.id = `zoom-${s.key}`;
    canvas.width = canvas.height = ZOOM_BOX;
    fig.append(canvas, s.title);
    $("zooms").append(fig);
  }
  for (const z of [1, 2]) $(`zoom${z}`).addEventListener("click", () => { state.zoom = z; drawZooms(); });
  const compare = $("compare");
  const follow = (e) => {
    const r = compare.getBoundingClientRect();
    state.fx = (e.clientX - r.left) / r.width;
    state.fy = (e.clientY - r.top) / r.height;
    drawZooms();
  };
  compare.addEventListener("mousemove", (e) => { if (!state.locked) follow(e); });
  compare.addEventListener("click", (e) => { state.locked = !state.locked; follow(e); });
}

function showRecalled(img) {
  const effect = $("effect");
  effect.hidden = !img.effect;
  effect.textContent = img.effect ? `memory: ${img.effect}` : "";
  const box = $("recalled");
  box.replaceChildren();
  if (!img.recalled) { box.hidden = true; return; }
  box.hidden = false;
  box.append(document.createTextNode("recalled by the memory (training image, score, percentile among the memory's own reads):"));
  for (const e of img.recalled) {
    const fig = document.createElement("figure");
    const rank = e.percentile === null || e.percentile === undefined ? "" : `, p${e.percentile}`;
    const label = `${e.name} (${e.score.toFixed(3)}${rank})`;
    if (e.thumb) {
      const im = document.createElement("img");
      im.src = e.thumb;
      im.alt = label;
      fig.append(im, document.createElement("br"));
    } else {
      fig.append("(no thumbnail)", document.createElement("br"));
    }
    fig.append(label);
    box.append(fig);
  }
}

function select(index) {
  const n = DATA.images.length;
  state.index = ((index % n) + n) % n;
  const img = DATA.images[state.index];
  $("name").textContent = `${img.name} (${state.index + 1}/${n}, ${img.w}x${img.h})`;
  $("compare").style.aspectRatio = `${img.w} / ${img.h}`;
  $("links").replaceChildren(...DATA.stages.map((s) => {
    const a = document.createElement("a");
    a.href = img.full[s.key];
    a.textContent = `${s.key} (full size)`;
    return a;
  }));
  for (const tr of document.querySelectorAll("#metrics tbody tr")) {
    tr.classList.toggle("current", Number(tr.dataset.i) === state.index);
  }
  showCompare();
  showRecalled(img);
  drawZooms();
  return loadFull(img);
}

function cellValue(tr, col) {
  const td = tr.children[col];
  if (td.dataset.v === undefined) return td.textContent;
  return td.dataset.v === "inf" ? Infinity : td.dataset.v === "" ? NaN : Number(td.dataset.v);
}

function sortBy(th) {
  const table = $("metrics");
  const col = Array.from(th.parentNode.children).indexOf(th);
  const dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
  for (const other of th.parentNode.children) other.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", dir);
  const sign = dir === "ascending" ? 1 : -1;
  const names = new Intl.Collator(undefined, {numeric: true});
  const rows = Array.from(table.tBodies[0].rows);
  rows.sort((a, b) => {
    const va = cellValue(a, col), vb = cellValue(b, col);
    if (typeof va === "string") return sign * names.compare(va, vb);
    if (Number.isNaN(va) || Number.isNaN(vb)) return Number.isNaN(va) - Number.isNaN(vb);  // blanks last
    return sign * (va === vb ? 0 : va < vb ? -1 : 1);
  });
  table.tBodies[0].append(...rows);
}

function onKey(e) {
  const tag = e.target.tagName;
  if (tag === "SELECT" || (tag === "INPUT" && e.target.id !== "slider") || e.altKey || e.ctrlKey || e.metaKey) return;
  const step = e.shiftKey ? 10 : 2;
  if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
    setSlider(Number($("slider").value) + (e.key === "ArrowRight" ? step : -step));
    e.preventDefault();
  } else if (e.key === "n" || e.key === "p") {
    const order = Array.from(document.querySelectorAll("#metrics tbody tr"), (tr) => Number(tr.dataset.i));
    const at = order.indexOf(state.index);
    select(order.length ? order[(at + (e.key === "n" ? 1 : -1) + order.length) % order.length]
                        : state.index + (e.key === "n" ? 1 : -1));
  }
}

function init() {
  fillChoosers();
  buildZooms();
  $("slider").addEventListener("input", () => setSlider(Number($("slider").value)));
  document.addEventListener("keydown", onKey);
  for (const th of document.querySelectorAll("#metrics th.sortable")) th.addEventListener("click", () => sortBy(th));
  for (const tr of document.querySelectorAll("#metrics tbody tr")) {
    tr.addEventListener("click", () => { select(Number(tr.dataset.i)); $("viewer").scrollIntoView(); });
  }
  $("prev").addEventListener("click", () => onKey({key: "p", target: document.body}));
  $("next").addEventListener("click", () => onKey({key: "n", target: document.body}));
  const first = document.querySelector("#metrics tbody tr");
  return select(first ? Number(first.dataset.i) : 0);
}

// Milliseconds from navigation to the load event (every preview drawn), for benchmarks/bench_page.py.
window.addEventListener("load", () => { document.body.dataset.loadMs = performance.now().toFixed(1); });

function loadSelfTest() {
  // The driver is a file of its own beside index.html (utils/page.py writes it), fetched only on request.
  const script = document.createElement("script");
  script.src = "selftest.js";
  script.onerror = () => console.error(`self-test: cannot load ${script.src}; write the page again (utils/page.py)`);
  document.body.append(script);
}

// The first photo shown, its full-size files loaded; selftest.js awaits it.
const pageReady = DATA.images.length ? init() : null;
if (pageReady && location.hash === "#selftest") loadSelfTest();
