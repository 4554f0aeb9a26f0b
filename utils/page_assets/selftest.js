// EMNet results page, self-test driver: loaded by page.js only when the page is opened with
// #selftest, from this file beside index.html, so the page as readers open it never carries it. It
// drives the page like a reader (key presses, clicks, mouse moves) and writes its findings into
// <pre id="selftest">, read back by tests/test_page.py. It uses page.js's globals (DATA, state,
// $, pageErrors, setSlider, select, zoomRegion) and awaits its `pageReady`.
"use strict";

function key(k) {
  document.body.dispatchEvent(new KeyboardEvent("keydown", {key: k, bubbles: true}));
}

function zoomProbe() {
  // Source pixel (sx+k, sy+k) must fill the zoom pane's z x z block at (k*z, k*z) in every stage.
  const {sx, sy, size} = zoomRegion();
  const k = Math.floor(size / 3);
  const out = {zoom: state.zoom, x: sx + k, y: sy + k, rgb: {}, block_uniform: true};
  for (const s of DATA.stages) {
    const px = $(`zoom-${s.key}`).getContext("2d", {willReadFrequently: true}).getImageData(k * state.zoom, k * state.zoom, state.zoom, state.zoom).data;
    out.rgb[s.key] = [px[0], px[1], px[2]];
    for (let i = 4; i < px.length; i += 4) {
      if (px[i] !== px[0] || px[i + 1] !== px[1] || px[i + 2] !== px[2]) out.block_uniform = false;
    }
  }
  return out;
}

function namesInTable() {
  return Array.from(document.querySelectorAll("#metrics tbody tr"), (tr) => tr.children[0].textContent);
}

async function selfTest(ready) {
  const report = {checks: {}, errors: pageErrors};
  try {
    await ready;
    setSlider(50);
    key("ArrowRight");
    key("ArrowRight");
    report.checks.slider_right = Number($("slider").value);
    report.checks.clip_right = $("left-img").style.clipPath;
    key("ArrowLeft");
    report.checks.slider_left = Number($("slider").value);
    $("left").value = DATA.stages[0].key;
    $("left").dispatchEvent(new Event("change"));
    report.checks.left_src = $("left-img").getAttribute("src");
    report.sorted = {};
    for (const th of document.querySelectorAll("#metrics th.sortable")) {
      th.click();
      report.sorted[th.dataset.col] = namesInTable();
    }
    const nameTh = document.querySelector('#metrics th[data-col="name"]');
    if (nameTh) { nameTh.removeAttribute("aria-sort"); nameTh.click(); }
    const start = state.index;
    key("n");
    report.checks.next = DATA.images[state.index].name;
    key("p");
    report.checks.back = DATA.images[state.index].name === DATA.images[start].name;
    await select(state.index);
    const r = $("compare").getBoundingClientRect();
    $("compare").dispatchEvent(new MouseEvent("mousemove", {clientX: r.left + 0.3 * r.width, clientY: r.top + 0.6 * r.height, bubbles: true}));
    report.image = DATA.images[state.index].name;
    report.effect = $("effect").hidden ? null : $("effect").textContent;
    report.loaded = DATA.stages.filter((s) => state.full[s.key]).map((s) => s.key);
    report.zoom = [];
    for (const z of [1, 2]) {
      $(`zoom${z}`).click();
      report.zoom.push(zoomProbe());
    }
  } catch (err) {
    pageErrors.push(`self-test: ${err}`);
  }
  const pre = document.createElement("pre");
  pre.id = "selftest";
  pre.textContent = JSON.stringify(report);
  document.body.append(pre);
}

selfTest(pageReady);
