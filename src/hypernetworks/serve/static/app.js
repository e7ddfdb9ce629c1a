// The demo page: pick a checkpoint and press Generate; the server streams the sample as the model
// computes it (server-sent events over a POST), and the text or pen strokes and the four traces of
// the HyperLSTM's weight-change intensity grow with every step that arrives.
// No libraries and no external assets, so it works offline.
"use strict";

(function () {
  const GATES = ["i", "g", "f", "o"];
  const GATE_COLOURS = ["#d1495b", "#2f5d8a", "#e09f3e", "#3d8361"];
  const CONNECT_TIMEOUT_MS = 30000;  // until the response headers; the stream itself has no limit

  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("controls"), checkpoint: $("checkpoint"), length: $("length"), temperature: $("temperature"),
    seed: $("seed"), prime: $("prime"), primeLabel: $("prime-label"), colour: $("colour"),
    generate: $("generate"), message: $("message"), output: $("output"), title: $("output-title"),
    progress: $("progress"), text: $("text-output"), ink: $("ink"), placeholder: $("placeholder"),
    traces: $("traces"), traceNote: $("trace-note"), legend: $("legend"),
  };

  let kinds = new Map();  // checkpoint id -> "text" | "strokes" | "unknown"
  let run = null;         // the generation in progress (or the last one)
  let busy = false;

  // ---- messages ------------------------------------------------------------------------
  function showMessage(text, isError) {
    els.message.textContent = text;
    els.message.classList.toggle("error", !!isError);
    els.message.hidden = false;
  }
  function clearMessage() { els.message.hidden = true; els.message.textContent = ""; }
  function setState(state) { els.output.dataset.state = state; }

  class ServerError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  // ---- server --------------------------------------------------------------------------
  async function post(path, body, signal) {
    let resp;
    try {
      resp = await fetch(path, {
        method: "POST", headers: { "Content-Type": "application/json", "Accept": "text/event-stream, application/json" },
        body: JSON.stringify(body), signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new Error("cannot reach the server: " + err.message);
    }
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }

  async function errorOf(resp) {
    let data = null;
    try { data = await resp.json(); } catch (err) { /* not JSON: use the status line */ }
    let text = (data && data.error) || `server error ${resp.status} ${resp.statusText}`.trim();
    const retry = resp.headers.get("Retry-After");
    if (resp.status === 503 && retry && !text.includes("try again")) text += ` (try again in ${retry} s)`;
    return new ServerError(text, resp.status);
  }

  // Server-sent events from a fetch body: blocks separated by a blank line, "event:" and "data:"
  // fields, ":" comments (keep-alive pings) ignored. onEvent(name, parsed JSON data).
  async function readEvents(body, onEvent) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let v = colon < 0 ? "" : line.slice(colon + 1);
          if (v.startsWith(" ")) v = v.slice(1);
          if (field === "event") name = v;
          else if (field === "data") data.push(v);
        }
        if (data.length) onEvent(name, JSON.parse(data.join("\n")));
      }
    }
  }

  async function loadCheckpoints() {
    try {
      const resp = await fetch("/api/checkpoints");
      if (!resp.ok) throw await errorOf(resp);
      const data = await resp.json();
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

  function setBusy(on) {
    busy = on;
    els.generate.textContent = on ? "Stop" : "Generate";
    els.generate.classList.toggle("stop", on);
  }

  async function generate(ev) {
    if (ev) ev.preventDefault();
    if (busy) {  // the button is "Stop" while a generation streams: closing it frees the server
      if (run && run.ctrl) run.ctrl.abort();
      return;
    }
    clearMessage();
    const req = {
      checkpoint: els.checkpoint.value,
      length: numberField(els.length),
      temperature: numberField(els.temperature),
      seed: numberField(els.seed),
    };
    if (!els.primeLabel.hidden && els.prime.value) req.prime = els.prime.value;
    const ctrl = new AbortController();
    run = { ctrl, req, ended: false };
    const thisRun = run;
    setBusy(true);
    setState("waiting");
    els.output.dataset.steps = "0";
    els.progress.textContent = "asking the model…";
    const timer = setTimeout(() => ctrl.abort(), CONNECT_TIMEOUT_MS);
    try {
      const resp = await post("/api/generate/stream", req, ctrl.signal);
      clearTimeout(timer);
      await readEvents(resp.body, (name, data) => onEvent(thisRun, name, data));
      if (!thisRun.ended) throw new Error("the connection closed before the sample was finished");
    } catch (err) {
      clearTimeout(timer);
      if (err.name === "AbortError") {
        if (thisRun.started) {  // stopped by the user: keep what arrived
          setState("stopped");
          els.progress.textContent = `stopped at step ${thisRun.steps.length} / ${thisRun.total}`;
        } else {
          setState("error");
          els.progress.textContent = "";
          showMessage("Error: the server did not answer in time", true);
        }
      } else {
        setState("error");
        showMessage("Error: " + err.message, true);
        if (!thisRun.started) els.progress.textContent = "";
        // The checkpoint went away (a training run replaced it, say): offer the current list.
        if (err.status === 404) await loadCheckpoints();
      }
    } finally {
      if (run === thisRun) setBusy(false);
    }
  }

  function onEvent(r, name, data) {
    if (run !== r) return;
    if (name === "queued") {
      setState("queued");
      els.progress.textContent = `waiting for the model (${data.ahead + 1} request${data.ahead ? "s" : ""} ahead)…`;
    } else if (name === "start") {
      start(r, data);
    } else if (name === "steps") {
      r.steps.push(...data.steps);
      r.intensity.push(...data.intensity);
      els.output.dataset.steps = String(r.steps.length);
      els.progress.textContent = `step ${r.steps.length} / ${r.total}`;
      schedule(r);
    } else if (name === "end") {
      r.ended = true;
      r.final = true;
      schedule(r);
      els.progress.textContent = `${data.steps} steps in ${Number(data.seconds).toFixed(1)} s`;
    } else if (name === "error") {
      r.ended = true;
      throw new ServerError(data.error || "generation failed", data.status);
    }
  }

  // ---- intensity -----------------------------------------------------------------------
  // Per-gate scale for drawing: the 98th percentile over the steps so far after the first, so
  // the transient at the first step (measured against the initial state) does not flatten the
  // rest; larger values are drawn clipped at the top. Recomputed as steps arrive.
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
  const textColour = (lvl) => `rgba(230, 57, 70, ${(0.05 + 0.55 * lvl).toFixed(3)})`;

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

  // The traces on an x axis as long as the requested sample, so they grow left to right.
  function drawTraces(r) {
    const { ctx, w, h } = r.traceCanvas;
    const intensity = r.intensity, max = r.max, upto = intensity.length;
    ctx.clearRect(0, 0, w, h);
    const left = 34, right = 10, top = 6, lane = (h - top - 18) / 4;
    const n = Math.max(r.total - 1, 1);
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

  // The pen path so far (offsets accumulated to positions), scaled to fit the canvas; redrawn
  // whole each frame because the bounding box grows with the ink.
  function drawInk(r) {
    const { ctx, w, h } = r.ink;
    let x = 0, y = 0;
    const pts = r.steps.map((s) => { x += +s[0] || 0; y += +s[1] || 0; return [x, y, s[2] ? 1 : 0]; });
    ctx.clearRect(0, 0, w, h);
    if (pts.length < 2) return;
    let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
    for (const [px, py] of pts) {
      minX = Math.min(minX, px); maxX = Math.max(maxX, px);
      minY = Math.min(minY, py); maxY = Math.max(maxY, py);
    }
    const pad = 16;
    const spanX = Math.max(maxX - minX, 1e-6), spanY = Math.max(maxY - minY, 1e-6);
    const scale = Math.min((w - 2 * pad) / spanX, (h - 2 * pad) / spanY);
    const ox = pad, oy = (h - spanY * scale) / 2;   // written left to right: keep it at the left edge
    const tx = (px) => ox + (px - minX) * scale;
    const ty = (py) => oy + (py - minY) * scale;    // IAM coordinates grow downwards, like the canvas
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = 2.2;
    for (let t = 1; t < pts.length; t++) {
      if (pts[t - 1][2]) continue;  // the pen was lifted after the previous point
      ctx.strokeStyle = r.colour ? levelColour(stepLevel(r.intensity[t], r.max)) : "#1d2330";
      ctx.beginPath();
      ctx.moveTo(tx(pts[t - 1][0]), ty(pts[t - 1][1]));
      ctx.lineTo(tx(pts[t][0]), ty(pts[t][1]));
      ctx.stroke();
    }
  }

  // ---- a generation --------------------------------------------------------------------
  function start(r, info) {
    Object.assign(r, {
      started: true, kind: info.kind, total: info.length, steps: [], intensity: [], max: [0, 0, 0, 0],
      drawnText: 0, raf: 0, colour: els.colour.checked, final: false,
    });
    kinds.set(r.req.checkpoint, info.kind);
    els.placeholder.hidden = true;
    els.output.dataset.kind = info.kind;
    els.output.dataset.steps = "0";
    els.traceNote.hidden = true;
    r.traceCanvas = fitCanvas(els.traces, 240);
    els.legend.hidden = !r.colour;
    els.legend.classList.toggle("text-mode", info.kind === "text");
    if (info.kind === "text") {
      els.title.textContent = "Generated text";
      els.ink.hidden = true;
      els.text.hidden = false;
      els.text.textContent = "";
      if (r.req.prime) {
        const p = document.createElement("span");
        p.className = "prime";
        p.textContent = r.req.prime;
        els.text.appendChild(p);
      }
    } else {
      els.title.textContent = "Generated handwriting";
      els.text.hidden = true;
      els.ink.hidden = false;
      r.ink = fitCanvas(els.ink, 260);
    }
    setState("streaming");
    els.progress.textContent = `step 0 / ${r.total}`;
    drawTraces(r);
  }

  // Draw at most once per animation frame, however many events arrived in between.
  function schedule(r) {
    if (!r.raf) r.raf = requestAnimationFrame(() => { r.raf = 0; draw(r); });
  }

  function draw(r) {
    if (run !== r || !r.started) return;
    r.max = gateScales(r.intensity);
    if (r.kind === "text") {
      const frag = document.createDocumentFragment();
      for (let t = r.drawnText; t < r.steps.length; t++) {
        const span = document.createElement("span");
        span.className = "step";
        span.textContent = String(r.steps[t]);
        if (r.colour) span.style.backgroundColor = textColour(stepLevel(r.intensity[t], r.max));
        frag.appendChild(span);
      }
      r.drawnText = r.steps.length;
      els.text.appendChild(frag);
      els.text.scrollTop = els.text.scrollHeight;
    } else {
      drawInk(r);
    }
    drawTraces(r);
    if (r.final) finish(r);
  }

  function finish(r) {
    const hasActivity = r.max.some((m) => m > 0);
    if (r.kind === "text" && r.colour) {
      // Colours chosen while streaming used the scale known then: redo them with the final one.
      const spans = els.text.querySelectorAll("span.step");
      spans.forEach((span, t) => {
        span.style.backgroundColor = hasActivity ? textColour(stepLevel(r.intensity[t], r.max)) : "";
      });
    }
    if (!r.steps.length) {
      els.placeholder.hidden = false;
      els.placeholder.textContent = "The model returned an empty sample.";
    }
    els.traceNote.hidden = hasActivity;
    els.traceNote.textContent = hasActivity ? "" : "All zero: this checkpoint is a plain LSTM, its weights do not change over time.";
    els.legend.hidden = !(r.colour && hasActivity);
    setState("done");
  }

  els.form.addEventListener("submit", generate);
  els.checkpoint.addEventListener("change", updateKindControls);
  loadCheckpoints();
})();
