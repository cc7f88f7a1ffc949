// The map of latents on a canvas: every point written into one ImageData (131,072 points in a few
// milliseconds), a grid index for the point under the pointer, wheel zoom, drag pan, shift-drag box.
(function () {
  "use strict";
  const canvas = document.getElementById("map");
  const source = document.getElementById("map-data");
  if (!canvas || !source) return;
  const data = JSON.parse(source.textContent);
  const tip = document.getElementById("map-tip");
  const legend = document.getElementById("map-legend");
  const status = document.getElementById("map-status");
  const n = data.x.length;
  const xs = Float32Array.from(data.x);
  const ys = Float32Array.from(data.y);
  const ids = data.feature_id;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
    "#31a354", "#756bb1", "#636363"];
  const MISSING = [203, 213, 225];
  const numeric = data.categories === null && data.colour !== "family" && data.colour !== "subfamily";

  function rgb(hex) {
    return [parseInt(hex.slice(1, 3), 16), parseInt(hex.slice(3, 5), 16), parseInt(hex.slice(5, 7), 16)];
  }
  const palette = PALETTE.map(rgb);
  // a colour per point, packed as little-endian RGBA for the ImageData's Uint32 view
  const packed = new Uint32Array(n);
  let low = Infinity, high = -Infinity;
  if (numeric) {
    for (const value of data.value) if (value !== null) { low = Math.min(low, value); high = Math.max(high, value); }
  }
  function ramp(t) { // from slate blue (low) to amber (high)
    const a = [59, 76, 192], b = [180, 4, 38];
    return [0, 1, 2].map((i) => Math.round(a[i] + (b[i] - a[i]) * t));
  }
  for (let i = 0; i < n; i++) {
    const value = data.value[i];
    let c = MISSING;
    if (value !== null && value !== undefined) {
      c = numeric ? ramp(high > low ? (value - low) / (high - low) : 0.5) : palette[value % palette.length];
    }
    packed[i] = (255 << 24) | (c[2] << 16) | (c[1] << 8) | c[0];
  }

  // the view: data → screen is (x - cx) * scale + width / 2
  let width = 0, height = 0, ratio = 1, cx = 0, cy = 0, scale = 1;
  function fit() {
    const [x0, x1] = data.x_range, [y0, y1] = data.y_range;
    if (x0 === null) return;
    cx = (x0 + x1) / 2; cy = (y0 + y1) / 2;
    scale = 0.92 * Math.min(width / Math.max(x1 - x0, 1e-6), height / Math.max(y1 - y0, 1e-6));
  }
  function resize() {
    ratio = window.devicePixelRatio || 1;
    width = canvas.clientWidth; height = canvas.clientHeight;
    canvas.width = Math.round(width * ratio); canvas.height = Math.round(height * ratio);
  }
  const screenX = (x) => (x - cx) * scale + width / 2;
  const screenY = (y) => height / 2 - (y - cy) * scale;
  const dataX = (px) => (px - width / 2) / scale + cx;
  const dataY = (py) => cy - (py - height / 2) / scale;

  let box = null, hovered = -1;
  function draw() {
    const context = canvas.getContext("2d");
    const image = context.createImageData(canvas.width, canvas.height);
    const pixels = new Uint32Array(image.data.buffer);
    pixels.fill(0xffffffff);
    const w = canvas.width, h = canvas.height, size = Math.max(2, Math.round(2 * ratio));
    for (let i = 0; i < n; i++) {
      const px = Math.round(screenX(xs[i]) * ratio), py = Math.round(screenY(ys[i]) * ratio);
      if (px < 0 || py < 0 || px >= w - size || py >= h - size) continue;
      const colour = packed[i];
      for (let dy = 0; dy < size; dy++) {
        const row = (py + dy) * w + px;
        for (let dx = 0; dx < size; dx++) pixels[row + dx] = colour;
      }
    }
    context.putImageData(image, 0, 0);
    context.save();
    context.scale(ratio, ratio);
    if (hovered >= 0) {
      context.strokeStyle = "#111827"; context.lineWidth = 2;
      context.beginPath(); context.arc(screenX(xs[hovered]), screenY(ys[hovered]), 6, 0, 2 * Math.PI); context.stroke();
    }
    if (box) {
      context.strokeStyle = "#2563eb"; context.fillStyle = "rgba(37, 99, 235, 0.12)"; context.lineWidth = 1.5;
      const x = Math.min(box.x0, box.x1), y = Math.min(box.y0, box.y1);
      context.fillRect(x, y, Math.abs(box.x1 - box.x0), Math.abs(box.y1 - box.y0));
      context.strokeRect(x, y, Math.abs(box.x1 - box.x0), Math.abs(box.y1 - box.y0));
    }
    context.restore();
  }
  let pending = false;
  function redraw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  }

  // a grid over the data's extent: the point under the pointer is searched in the cells nearby
  const CELLS = 256;
  const [gx0, gx1] = [data.x_range[0] ?? 0, data.x_range[1] ?? 1], [gy0, gy1] = [data.y_range[0] ?? 0, data.y_range[1] ?? 1];
  const cellW = Math.max(gx1 - gx0, 1e-6) / CELLS, cellH = Math.max(gy1 - gy0, 1e-6) / CELLS;
  const cellOf = (x, y) => Math.min(CELLS - 1, Math.max(0, Math.floor((x - gx0) / cellW))) * CELLS
    + Math.min(CELLS - 1, Math.max(0, Math.floor((y - gy0) / cellH)));
  const counts = new Uint32Array(CELLS * CELLS + 1);
  for (let i = 0; i < n; i++) counts[cellOf(xs[i], ys[i]) + 1]++;
  for (let c = 1; c <= CELLS * CELLS; c++) counts[c] += counts[c - 1];
  const order = new Uint32Array(n), fill = counts.slice(0, CELLS * CELLS);
  for (let i = 0; i < n; i++) order[fill[cellOf(xs[i], ys[i])]++] = i;
  function nearest(px, py, radius) {
    const x = dataX(px), y = dataY(py), r = radius / scale;
    const cx0 = Math.max(0, Math.floor((x - r - gx0) / cellW)), cx1 = Math.min(CELLS - 1, Math.floor((x + r - gx0) / cellW));
    const cy0 = Math.max(0, Math.floor((y - r - gy0) / cellH)), cy1 = Math.min(CELLS - 1, Math.floor((y + r - gy0) / cellH));
    let best = -1, bestDistance = r * r;
    for (let i = cx0; i <= cx1; i++) for (let j = cy0; j <= cy1; j++) {
      const cell = i * CELLS + j;
      for (let k = counts[cell]; k < counts[cell + 1]; k++) {
        const p = order[k], dx = xs[p] - x, dy = ys[p] - y, d = dx * dx + dy * dy;
        if (d <= bestDistance) { best = p; bestDistance = d; }
      }
    }
    return best;
  }

  const explained = new Map();
  function escape(text) {
    const span = document.createElement("span"); span.textContent = text ?? ""; return span.innerHTML;
  }
  async function explanations(feature) {
    if (!explained.has(feature)) {
      explained.set(feature, fetch(`/api/map/explanations?feature_id=${feature}`).then((r) => r.json()));
    }
    return explained.get(feature);
  }
  async function show(index, px, py) {
    const feature = ids[index];
    const family = data.family_names[data.family_id[index]];
    const value = data.value[index];
    const shown = value === null ? "–" : (numeric ? Number(value).toFixed(3) : (data.categories ? data.categories[value] : value));
    tip.hidden = false;
    tip.style.left = `${Math.min(px + 14, width - 320)}px`; tip.style.top = `${py + 14}px`;
    tip.innerHTML = `<b>#${feature}</b> · family ${data.family_id[index]}${family ? " “" + escape(family) + "”" : ""}<br>`
      + `<span class="dim">${escape(data.colour)}: ${escape(String(shown))}</span><div class="tip-text">…</div>`;
    tip.dataset.feature = String(feature);
    const found = await explanations(feature);
    if (tip.dataset.feature !== String(feature)) return;
    const lines = found.explanations.map((item) => `<div><b>${escape(item.explainer.split("/").pop())}</b>: ${escape(item.text)}</div>`);
    tip.querySelector(".tip-text").innerHTML = lines.length ? lines.join("") : '<span class="dim">not explained</span>';
  }

  let drag = null;
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    drag = { x: event.offsetX, y: event.offsetY, cx, cy, moved: false, box: event.shiftKey };
    if (drag.box) box = { x0: event.offsetX, y0: event.offsetY, x1: event.offsetX, y1: event.offsetY };
  });
  canvas.addEventListener("pointermove", (event) => {
    if (drag) {
      if (Math.abs(event.offsetX - drag.x) + Math.abs(event.offsetY - drag.y) > 3) drag.moved = true;
      if (drag.box) { box.x1 = event.offsetX; box.y1 = event.offsetY; }
      else { cx = drag.cx - (event.offsetX - drag.x) / scale; cy = drag.cy + (event.offsetY - drag.y) / scale; }
      redraw();
      return;
    }
    const found = nearest(event.offsetX, event.offsetY, 8);
    if (found !== hovered) {
      hovered = found;
      redraw();
      if (found >= 0) show(found, event.offsetX, event.offsetY); else tip.hidden = true;
    }
  });
  canvas.addEventListener("pointerleave", () => { if (!drag) { hovered = -1; tip.hidden = true; redraw(); } });
  canvas.addEventListener("pointerup", (event) => {
    const finished = drag; drag = null;
    if (finished && finished.box && finished.moved) {
      const x0 = dataX(Math.min(box.x0, box.x1)), x1 = dataX(Math.max(box.x0, box.x1));
      const y0 = dataY(Math.max(box.y0, box.y1)), y1 = dataY(Math.min(box.y0, box.y1));
      let inside = 0;
      for (let i = 0; i < n; i++) if (xs[i] >= x0 && xs[i] <= x1 && ys[i] >= y0 && ys[i] <= y1) inside++;
      status.textContent = `${inside.toLocaleString()} latents selected: opening them in the table…`;
      const bounds = [x0, y0, x1, y1].map((value) => value.toFixed(6)).join(",");
      window.location.assign(`/?box=${bounds}&limit=1000`);
      return;
    }
    box = null;
    if (finished && !finished.moved) {
      const found = nearest(event.offsetX, event.offsetY, 8);
      if (found >= 0) window.location.assign(`/features/${ids[found]}`);
    }
    redraw();
  });
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    const factor = Math.exp(-event.deltaY * 0.0015);
    const x = dataX(event.offsetX), y = dataY(event.offsetY);
    scale *= factor;
    cx = x - (event.offsetX - width / 2) / scale; cy = y + (event.offsetY - height / 2) / scale;
    redraw();
  }, { passive: false });
  window.addEventListener("resize", () => { resize(); redraw(); });

  function drawLegend() {
    if (numeric) {
      legend.innerHTML = low <= high
        ? `<span>${low.toFixed(3)}</span><span class="ramp"></span><span>${high.toFixed(3)}</span><span class="swatch missing"></span> no value`
        : '<span class="dim">no values</span>';
      return;
    }
    const entries = data.categories
      ? data.categories.map((name, code) => [code, name])
      : data.family_names.slice(0, 12).map((name, id) => [id, `${id}: ${name ?? "(unexplained)"} · ${data.family_sizes[id]}`]);
    legend.innerHTML = entries.map(([code, name]) =>
      `<span class="entry"><span class="swatch" style="background:${PALETTE[code % PALETTE.length]}"></span>${escape(name)}</span>`).join("");
  }

  resize(); fit(); drawLegend(); draw();
  canvas.dataset.ready = "true";
  status.textContent = `${n.toLocaleString()} latents drawn`;
  // for tests: where a point is on the screen
  window.saeAtlasMap = { screenOf: (index) => ({ x: screenX(xs[index]), y: screenY(ys[index]) }) };
})();
