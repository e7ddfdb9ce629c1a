// The demo page: pick a checkpoint, ask the server for a sample, then replay it step by step
// (text characters or pen strokes) beside four traces of the HyperLSTM's weight-change intensity.
// No libraries and no external assets, so it works offline.
"use strict";

(function () {
  const GATES = ["i", "g", "f", "o"];
  const GATE_COLOURS = ["#d1495b", "#2f5d8a", "#e09f3e", "#3d8361"];
  const REQUEST_TIMEOUT_MS = 180000;

  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("controls"), checkpoint: $("checkpoint"), length: $("length"), temperature: $("temperature"),
    seed: $("seed"), prime: $("prime"), primeLabel: $("prime-label"), speed: $("speed"), colour: $("colour"),
    generate: $("generate"), message: $("message"), output: $("output"), title: $("output-title"),
    progress: $("progress"), text: $("text-output"), ink: $("ink"), placeholder: $("placeholder"),
    traces: $("traces"), traceNote: $("trace-note"), legend: $("legend"),
  };

  let kinds = new Map();      // checkpoint id -> "text" | "strokes" | "unknown"
  let anim = null;       // the replay in progress
  let busy = false;

  // ---- messages ------------------------------------------------------------------------
  function showMessage(text, isError) {
    els.message.textContent = text;
    els.message.classList.toggle("error", !!isError);
    els.message.hidden = false;
  }
  function clearMessage() { els.message.hidden = true; els.message.textContent = ""; }
  function setState(state) { els.output.dataset.state = state; }

  // ---- server --------------------------------------------------------------------------
  async function api(path, body) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), REQUEST_TIMEOUT_MS);
    let resp;
    try {
      resp = await fetch(path, body === undefined ? { signal: ctrl.signal } : {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: ctrl.signal,
      });
    } catch (err) {
      throw new Error(err.name === "AbortError" ? "the server did not answer in time" : "cannot reach the server: " + err.message);
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    try { data = await resp.json(); } catch (err) { /* reported below */ }
    if (!resp.ok) {
      const err = new Error((data && data.error) || `server error ${resp.status} ${resp.statusText}`);
      err.status = resp.status;
      throw err;
    }
    if (data === null) throw new Error("the server sent a reply that is not JSON");
    return data;
  }

  async function loadCheckpoints() {
    try {
      const data = await api("/api/checkpoints");
      const previous = els.checkpoint.value;
      els.checkpoint.innerHTML = "";
      kinds = new Map();
      for (const c of data.checkpoints) {
        kinds.set(c.id, c.kind);
        const opt = document.createElement("option");
        opt.value = c.id;
        const label = c.kind === "strokes" ? "handwriting" : c.kind === "text" ? "text" : "?";
        opt.textContent = `${c.name}  [${label}]`;
        els.checkpoint.appendChild(opt);
      }
      if (kinds.has(previous)) els.checkpoint.value = previous;
      if (data.limits && data.limits.length) els.length.max = data.limits.length[1];
      els.checkpoint.disabled = false;
      els.generate.disabled = data.checkpoints.length === 0;
      if (data.checkpoints.length === 0) showMessage("The server has no checkpoints.", true);
      updateKindControls();
    } catch (err) {
      els.checkpoint.innerHTML = '<option value="">(none)</option>';
      showMessage("Could not list checkpoints: " + err.message, true);
    }
  }

  function updateKindControls() {
    // Handwriting models are unconditional here: the prime box only applies to text.
    els.primeLabel.hidden = kinds.get(els.checkpoint.value) === "strokes";
  }

  // A number field holding something that is not a number is sent as typed, so the
  // server's message names the problem rather than the page guessing.
  function numberField(input) {
    const raw = input.value.trim();
    const n = Number(raw);
    return raw !== "" && Number.isFinite(n) ? n : raw;
  }

  async function generate(ev) {
    if (ev) ev.preventDefault();
    if (busy) return;
    stopAnimation();
    clearMessage();
    const req = {
      checkpoint: els.checkpoint.value,
      length: numberField(els.length),
      temperature: numberField(els.temperature),
      seed: numberField(els.seed),
    };
    if (!els.primeLabel.hidden && els.prime.value) req.prime = els.prime.value;
    busy = true;
    els.generate.disabled = true;
    els.generate.textContent = "Generating…";
    setState("loading");
    els.progress.textContent = "asking the model…";
    try {
      const result = await api("/api/generate", req);
      kinds.set(req.checkpoint, result.kind);
      startAnimation(result, req);
    } catch (err) {
      setState("error");
      els.progress.textContent = "";
      showMessage("Error: " + err.message, true);
      // The checkpoint went away (a training run replaced it, say): offer the current list.
      if (err.status === 404) await loadCheckpoints();
    } finally {
      busy = false;
      els.generate.disabled = false;
      els.generate.textContent = "Generate";
    }
  }

  // ---- intensity -----------------------------------------------------------------------
  // Per-gate scale for drawing: the 98th percentile over the steps after the first, so the
  // transient at the first step (measured against the initial state) does not flatten the
  // rest; larger values are drawn clipped at the top.
  function gateScales(intensity) {
    const scale = [0, 0, 0, 0];
    for (let k = 0; k < 4; k++) {
      const all = [];
      for (const row of intensity) {
        const v = row && row[k];
        if (typeof v === "number" && isFinite(v)) all.push(v);
      }
      const rest = (all.length > 1 ? all.slice(1) : all).sort((a, b) => a - b);
      const q = rest.length ? rest[Math.floor(0.98 * (rest.length - 1))] : 0;
      scale[k] = q > 0 ? q : Math.max(0, ...all);
    }
    return scale;
  }

  // Mean over gates of intensity / that gate's scale (clipped at 1): one number in [0, 1] per step.
  function stepLevel(row, max) {
    if (!row) return 0;
    let s = 0, n = 0;
    for (let k = 0; k < 4; k++) {
      if (max[k] > 0 && typeof row[k] === "number") { s += Math.min(1, row[k] / max[k]); n++; }
    }
    return n ? s / n : 0;
  }

  // Dark blue (quiet) to orange-red (large weight change).
  function levelColour(x) {
    x = Math.max(0, Math.min(1, x));
    const a = [29, 53, 87], b = [230, 57, 70], c = [244, 162, 97];
    const [p, q, t] = x < 0.5 ? [a, b, x * 2] : [b, c, (x - 0.5) * 2];
    const m = (i) => Math.round(p[i] + (q[i] - p[i]) * t);
    return `rgb(${m(0)},${m(1)},${m(2)})`;
  }

  // ---- canvases ------------------------------------------------------------------------
  function fitCanvas(canvas, cssHeight) {
    const ratio = window.devicePixelRatio || 1;
    const cssWidth = canvas.clientWidth || canvas.parentElement.clientWidth || 1000;
    canvas.style.height = cssHeight + "px";
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return { ctx, w: cssWidth, h: cssHeight };
  }

  function drawTraces(intensity, max, upto) {
    const { ctx, w, h } = anim.traceCanvas;
    ctx.clearRect(0, 0, w, h);
    const left = 34, right = 10, top = 6, lane = (h - top - 18) / 4;
    const n = Math.max(intensity.length - 1, 1);
    const x = (t) => left + (t / n) * (w - left - right);
    ctx.font = "bold 13px system-ui, sans-serif";
    for (let k = 0; k < 4; k++) {
      const y0 = top + lane * (k + 1) - 4;   // lane baseline
      const hh = lane - 10;                  // lane drawing height
      ctx.strokeStyle = "#e6e3dc";
      ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(left, y0 + 0.5); ctx.lineTo(w - right, y0 + 0.5); ctx.stroke();
      ctx.fillStyle = GATE_COLOURS[k];
      ctx.fillText(GATES[k], 10, y0 - hh / 2 + 5);
      if (upto < 1) continue;
      const yv = (t) => {
        const v = intensity[t] && intensity[t][k];
        return y0 - (max[k] > 0 && typeof v === "number" ? Math.min(1, v / max[k]) * hh : 0);
      };
      ctx.beginPath();
      ctx.moveTo(x(0), y0);
      for (let t = 0; t < upto; t++) ctx.lineTo(x(t), yv(t));
      ctx.lineTo(x(upto - 1), y0);
      ctx.closePath();
      ctx.globalAlpha = 0.22; ctx.fill(); ctx.globalAlpha = 1;
      ctx.beginPath();
      for (let t = 0; t < upto; t++) (t ? ctx.lineTo(x(t), yv(t)) : ctx.moveTo(x(t), yv(t)));
      ctx.strokeStyle = GATE_COLOURS[k];
      ctx.lineWidth = 1.3;
      ctx.stroke();
    }
    ctx.fillStyle = "#8a8f98";
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText("step →", w - right - 44, h - 4);
    els.traces.dataset.points = String(upto);
  }

  // Absolute pen positions from (dx, dy, pen_up) offsets, and a transform that fits them.
  function layoutStrokes(steps, canvas) {
    let x = 0, y = 0;
    const pts = steps.map((s) => { x += +s[0] || 0; y += +s[1] || 0; return [x, y, s[2] ? 1 : 0]; });
    let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
    for (const [px, py] of pts) {
      minX = Math.min(minX, px); maxX = Math.max(maxX, px);
      minY = Math.min(minY, py); maxY = Math.max(maxY, py);
    }
    const spanX = Math.max(maxX - minX, 1e-6), spanY = Math.max(maxY - minY, 1e-6);
    const cssWidth = canvas.clientWidth || 1000;
    const pad = 16;
    // Keep the ink's aspect ratio; a line of handwriting is wide and short.
    const cssHeight = Math.max(140, Math.min(420, Math.round((cssWidth - 2 * pad) * spanY / spanX) + 2 * pad));
    const fitted = fitCanvas(canvas, cssHeight);
    const scale = Math.min((fitted.w - 2 * pad) / spanX, (fitted.h - 2 * pad) / spanY);
    const ox = (fitted.w - spanX * scale) / 2, oy = (fitted.h - spanY * scale) / 2;
    return {
      pts, ...fitted,
      tx: (px) => ox + (px - minX) * scale,
      ty: (py) => oy + (py - minY) * scale,   // IAM coordinates already grow downwards, like the canvas
    };
  }

  // ---- replay --------------------------------------------------------------------------
  function stopAnimation() {
    if (anim && anim.raf) cancelAnimationFrame(anim.raf);
    anim = null;
  }

  function startAnimation(result, req) {
    const steps = Array.isArray(result.steps) ? result.steps : [];
    const intensity = Array.isArray(result.intensity) ? result.intensity : [];
    const max = gateScales(intensity);
    const hasActivity = max.some((m) => m > 0);
    els.placeholder.hidden = steps.length > 0;
    if (!steps.length) els.placeholder.textContent = "The model returned an empty sample.";
    els.output.dataset.kind = result.kind;
    els.output.dataset.steps = "0";
    els.traceNote.hidden = hasActivity;
    els.traceNote.textContent = hasActivity ? "" : "All zero: this checkpoint is a plain LSTM, its weights do not change over time.";

    anim = { result, steps, intensity, max, t: 0, raf: 0, colour: els.colour.checked && hasActivity };
    anim.traceCanvas = fitCanvas(els.traces, 240);
    els.legend.hidden = !anim.colour;
    els.legend.classList.toggle("text-mode", result.kind === "text");

    if (result.kind === "text") {
      els.title.textContent = "Generated text";
      els.ink.hidden = true;
      els.text.hidden = false;
      els.text.textContent = "";
      if (req.prime) {
        const p = document.createElement("span");
        p.className = "prime";
        p.textContent = req.prime;
        els.text.appendChild(p);
      }
    } else {
      els.title.textContent = "Generated handwriting";
      els.text.hidden = true;
      els.ink.hidden = false;
      anim.ink = layoutStrokes(steps, els.ink);
      anim.ink.ctx.clearRect(0, 0, anim.ink.w, anim.ink.h);
    }
    setState("animating");
    drawTraces(intensity, max, 0);
    anim.raf = requestAnimationFrame(frame);
  }

  function drawSteps(from, to) {
    const a = anim;
    if (a.result.kind === "text") {
      const frag = document.createDocumentFragment();
      for (let t = from; t < to; t++) {
        const span = document.createElement("span");
        span.textContent = String(a.steps[t]);
        if (a.colour) {
          const lvl = stepLevel(a.intensity[t], a.max);
          span.style.backgroundColor = `rgba(230, 57, 70, ${(0.05 + 0.55 * lvl).toFixed(3)})`;
        }
        frag.appendChild(span);
      }
      els.text.appendChild(frag);
      els.text.scrollTop = els.text.scrollHeight;
    } else {
      const { ctx, pts, tx, ty } = a.ink;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.lineWidth = 2.2;
      for (let t = Math.max(from, 1); t < to; t++) {
        if (pts[t - 1][2]) continue;  // the pen was lifted after the previous point
        ctx.strokeStyle = a.colour ? levelColour(stepLevel(a.intensity[t], a.max)) : "#1d2330";
        ctx.beginPath();
        ctx.moveTo(tx(pts[t - 1][0]), ty(pts[t - 1][1]));
        ctx.lineTo(tx(pts[t][0]), ty(pts[t][1]));
        ctx.stroke();
      }
    }
  }

  function frame() {
    const a = anim;
    if (!a) return;
    const speed = Math.max(1, parseInt(els.speed.value, 10) || 1);
    const next = Math.min(a.steps.length, a.t + speed);
    drawSteps(a.t, next);
    a.t = next;
    drawTraces(a.intensity, a.max, Math.min(a.t, a.intensity.length));
    els.output.dataset.steps = String(a.t);
    els.progress.textContent = `step ${a.t} / ${a.steps.length}`;
    if (a.t < a.steps.length) {
      a.raf = requestAnimationFrame(frame);
    } else {
      a.raf = 0;
      setState("done");
    }
  }

  els.form.addEventListener("submit", generate);
  els.checkpoint.addEventListener("change", updateKindControls);
  loadCheckpoints();
})();
