// attnserve attention explorer: plain JavaScript, no dependencies, no build step.
// It asks the server for the attention of the one layer it shows (all heads of it, so the head
// selector and the grid need no second request); switching layer replays the sequence as token
// ids for the new layer only, so a long conversation stays light.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const DECADES = 3; // the log scale spans three decades below the largest weight shown
  const MAX_HEATMAP_PX = 560;
  const VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70",
    "#7ad151", "#bddf26", "#fde725"];
  const LUT = buildLut(VIRIDIS, 256);
  const FUTURE = [238, 238, 234]; // keys after the query: the causal mask, never attended to
  const SINK = [170, 170, 170]; // the first-token column while it is left out of the scale
  const NOT_KEPT = [255, 255, 255]; // top-k rows: a key outside the row's k largest weights
  const SPECIAL = /^(<\|[^|]*\|>|<\/?s>|<unk>|<pad>)$/;

  const state = {
    model: null,
    mode: "chat",
    messages: [], // the conversation so far (chat mode)
    tokens: [], // {text, prompt, special}
    promptIds: [],
    promptLen: 0,
    genIds: null, // the generated tokens' ids, recovered by re-tokenizing when a layer is replayed
    specialsPrefix: null,
    layers: new Map(), // layer -> rows by query position: {heads, ctx, w: Float32Array(heads * ctx)}
    layer: 0,
    head: "mean",
    hideSink: true,
    attnTopK: 0, // top-k per row asked with the text shown (0: whole rows)
    logScale: false,
    bytes: 0, // weights of the sequence shown (reset with each new prompt)
    rowsReceived: 0,
    totalBytes: 0, // since the page loaded
    dtypes: new Set(),
    hover: null,
    pinned: null,
    busy: false,
    abort: null,
    frame: 0,
  };
  // For the browser test and for the curious, at the console: the state and the colour scale.
  window.explorer = state;
  state.palette = { lut: LUT, future: FUTURE, sink: SINK, notKept: NOT_KEPT, decades: DECADES };

  // ------------------------------------------------------------------ colours
  function hexRgb(hex) {
    return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  }

  function buildLut(stops, size) {
    const rgb = stops.map(hexRgb);
    const lut = [];
    for (let i = 0; i < size; i++) {
      const x = (i / (size - 1)) * (rgb.length - 1);
      const j = Math.min(Math.floor(x), rgb.length - 2);
      const f = x - j;
      lut.push(rgb[j].map((c, k) => Math.round(c + f * (rgb[j + 1][k] - c))));
    }
    return lut;
  }

  // A weight as a 0..1 position on the colour scale (linear, or log over DECADES below vmax).
  function norm(v, vmax) {
    let x = v / vmax;
    if (state.logScale) x = (Math.log10(Math.max(v, 1e-30)) - Math.log10(vmax)) / DECADES + 1;
    return Math.min(1, Math.max(0, x));
  }

  // ------------------------------------------------------------------ server
  function headers() {
    const h = { "content-type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.authorization = `Bearer ${key}`;
    return h;
  }

  async function api(path, body, signal = state.abort ? state.abort.signal : undefined) {
    const init = { headers: headers(), signal };
    if (body !== undefined) Object.assign(init, { method: "POST", body: JSON.stringify(body) });
    const res = await fetch(path, init);
    if (!res.ok) throw new Error(await errorText(res));
    return res;
  }

  async function errorText(res) {
    try {
      const j = await res.json();
      return `${res.status}: ${(j.error && j.error.message) || JSON.stringify(j)}`;
    } catch {
      return `${res.status} ${res.statusText}`;
    }
  }

  async function loadModel() {
    const list = await (await api("/v1/models")).json();
    const id = list.data[0].id;
    const m = await (await api(`/v1/models/${encodeURIComponent(id)}`)).json();
    state.model = m;
    state.layer = m.num_layers - 1;
    $("model-line").textContent =
      `${m.id} · ${m.architecture} · ${m.num_layers} layers × ${m.num_heads} heads · context ${m.context_length} · ` +
      `${m.dtype} on ${m.device}`;
    fillSelectors();
  }

  // Only the shown layer, every head of it, float16: the lightest ask that still feeds the grid.
  // With top-k, each head's row keeps its k largest weights (and their key positions) only.
  function attentionAsk(layer, topK = state.attnTopK) {
    const ask = { layers: [layer], head_reduction: "none", include_prompt: true, dtype: "float16" };
    if (topK > 0) ask.top_k = topK;
    return ask;
  }

  function numberIn(id, fallback) {
    const text = $(id).value.trim();
    const v = Number(text);
    return text === "" || !Number.isFinite(v) ? fallback : v;
  }

  // The prompt box as a request's input: the chat so far plus this message, or a raw prompt.
  function promptInput(mode, text) {
    return mode === "chat" ? { messages: [...state.messages, { role: "user", content: text }] } : { prompt: text };
  }

  function completionPath(mode) {
    return mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
  }

  function sampling() {
    const num = (id) => (($(id).value.trim() === "") ? undefined : Number($(id).value));
    const body = { max_tokens: num("max-tokens"), temperature: num("temperature"), top_p: num("top-p") };
    const topK = num("top-k");
    const seed = num("seed");
    if (topK) body.top_k = topK;
    if (seed !== undefined) body.seed = seed;
    return body;
  }

  // Reads a server-sent-events body; calls onChoice for every choice of every chunk.
  async function readEvents(res, onChoice) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) onChoice(choice);
        }
      }
      scheduleRender();
    }
  }

  // ------------------------------------------------------------------ weights
  function base64Bytes(text) {
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }

  function halfToFloat(h) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }

  // Little-endian float16 or float32 bytes of shape (num_heads, context_len), as the server sends them.
  function decodeWeights(bytes, dtype, count) {
    const view = new DataView(bytes.buffer);
    const size = dtype === "float32" ? 4 : 2;
    if (bytes.length !== count * size) throw new Error(`${bytes.length} bytes do not hold ${count} ${dtype} weights`);
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) {
      out[i] = size === 4 ? view.getFloat32(i * 4, true) : halfToFloat(view.getUint16(i * 2, true));
    }
    return out;
  }

  // One row as the page keeps it: {heads, ctx, kept, w, pos}; whole rows have w (heads, ctx) and
  // kept 0; top-k rows have w and pos (heads, kept), the weights largest first. Returns its bytes.
  function decodeRow(row) {
    const bytes = base64Bytes(row.weights);
    const kept = row.num_kept || 0;
    const w = decodeWeights(bytes, row.dtype, row.num_heads * (kept || row.context_len));
    let pos = null;
    let posBytes = 0;
    if (kept) {
      const raw = base64Bytes(row.positions);
      const view = new DataView(raw.buffer);
      if (raw.length !== row.num_heads * kept * 4) throw new Error(`${raw.length} bytes do not hold the positions`);
      pos = new Int32Array(row.num_heads * kept);
      for (let i = 0; i < pos.length; i++) pos[i] = view.getInt32(i * 4, true);
      posBytes = raw.length;
    }
    return { row: { heads: row.num_heads, ctx: row.context_len, kept, w, pos }, bytes: bytes.length + posBytes };
  }

  function storeRow(row) {
    const { row: kept, bytes } = decodeRow(row);
    if (!state.layers.has(row.layer)) state.layers.set(row.layer, []);
    state.layers.get(row.layer)[row.position] = kept;
    state.bytes += bytes;
    state.totalBytes += bytes;
    state.rowsReceived += 1;
    state.dtypes.add(row.num_kept ? `${row.dtype}, top-${state.attnTopK} per head row` : row.dtype);
  }

  // Rows 0..n-1 of a layer that have arrived (they arrive in order).
  function rowCount(layer) {
    const rows = state.layers.get(layer) || [];
    let n = 0;
    while (rows[n]) n++;
    return n;
  }

  // A row's weights for one head (an index, "mean" or "max") over its whole context, NaN where a
  // top-k row kept no weight (a key kept by some heads only counts 0 for the others in the mean).
  function rowView(row, head) {
    if (row.view && row.view.head === head) return row.view.values;
    const values = new Float32Array(row.ctx);
    const heads = typeof head === "number" ? [head] : Array.from({ length: row.heads }, (_, h) => h);
    if (!row.kept) {
      for (let k = 0; k < row.ctx; k++) {
        let acc = head === "max" ? -Infinity : 0;
        for (const h of heads) {
          const v = row.w[h * row.ctx + k];
          acc = head === "max" ? Math.max(acc, v) : acc + v;
        }
        values[k] = head === "mean" ? acc / row.heads : acc;
      }
    } else {
      values.fill(NaN);
      for (const h of heads) {
        for (let j = 0; j < row.kept; j++) {
          const k = row.pos[h * row.kept + j];
          const v = row.w[h * row.kept + j];
          const old = Number.isNaN(values[k]) ? (head === "max" ? -Infinity : 0) : values[k];
          values[k] = head === "max" ? Math.max(old, v) : old + v;
        }
      }
      if (head === "mean") for (let k = 0; k < row.ctx; k++) values[k] /= row.heads;
    }
    row.view = { head, values };
    return values;
  }

  function cellValue(row, k, head) {
    return rowView(row, head)[k];
  }

  // The (n, n) query x key matrix of rows by query position and a head (mean, max or an index);
  // -1 marks the causal mask, NaN a key a top-k row did not keep.
  function matrixOf(rows, n, head) {
    const values = new Float32Array(n * n).fill(-1);
    let vmax = 0;
    for (let q = 0; q < n; q++) {
      const view = rowView(rows[q], head);
      for (let k = 0; k < Math.min(view.length, n); k++) {
        const v = view[k];
        values[q * n + k] = v;
        if (!(state.hideSink && k === 0) && v > vmax) vmax = v;
      }
    }
    return { n, values, vmax: vmax || 1 };
  }

  function matrix(layer, head) {
    return matrixOf(state.layers.get(layer) || [], rowCount(layer), head);
  }

  // ------------------------------------------------------------------ drawing
  function paint(canvas, m, cell) {
    const { n, values, vmax } = m;
    canvas.width = n * cell;
    canvas.height = n * cell;
    if (!n) return;
    const image = new ImageData(n, n);
    for (let i = 0; i < n * n; i++) {
      const v = values[i];
      const rgb = Number.isNaN(v) ? NOT_KEPT : v < 0 ? FUTURE : state.hideSink && i % n === 0 ? SINK
        : LUT[Math.round(norm(v, vmax) * 255)];
      image.data.set([rgb[0], rgb[1], rgb[2], 255], i * 4);
    }
    const small = document.createElement("canvas");
    small.width = n;
    small.height = n;
    small.getContext("2d").putImageData(image, 0, 0);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false; // one crisp block per weight
    ctx.drawImage(small, 0, 0, n * cell, n * cell);
  }

  function renderHeatmap() {
    const canvas = $("heatmap");
    const m = matrix(state.layer, state.head);
    const cell = m.n ? Math.max(1, Math.min(24, Math.floor(MAX_HEATMAP_PX / m.n))) : 1;
    paint(canvas, m, cell);
    Object.assign(canvas.dataset, { rows: m.n, cols: m.n, cell, layer: state.layer, head: state.head });
    const focus = focusRow();
    if (focus !== null && focus < m.n) {
      const ctx = canvas.getContext("2d");
      ctx.strokeStyle = "#e8590c";
      ctx.lineWidth = 2;
      ctx.strokeRect(1, focus * cell + 1, (focus + 1) * cell - 2, cell - 2);
    }
    renderLabels(m.n, cell, focus);
    renderScale(m.vmax);
    return m;
  }

  // Token texts beside the rows and above the columns, every few cells where the cells are small.
  function renderLabels(n, cell, focus) {
    const rows = $("row-labels");
    const cols = $("col-labels");
    const size = 84;
    rows.width = n ? size : 0;
    rows.height = n * cell;
    cols.width = n * cell;
    cols.height = n ? size : 0;
    const step = Math.ceil(8 / cell);
    const font = `${Math.max(7, Math.min(11, cell - 1))}px ui-monospace, "DejaVu Sans Mono", monospace`;
    const r = rows.getContext("2d");
    const c = cols.getContext("2d");
    for (const ctx of [r, c]) Object.assign(ctx, { font, textBaseline: "middle" });
    r.textAlign = "right";
    for (let i = 0; i < n; i++) {
      if (i % step && i !== focus) continue;
      const text = tokenLabel(i);
      for (const ctx of [r, c]) ctx.fillStyle = i === focus ? "#e8590c" : "#55555a";
      r.fillText(text, size - 4, i * cell + cell / 2);
      c.save();
      c.translate(i * cell + cell / 2, size - 4);
      c.rotate(-Math.PI / 2);
      c.fillText(text, 0, 0);
      c.restore();
    }
  }

  function tokenLabel(i) {
    const t = state.tokens[i];
    const text = t ? t.text.replace(/\n/g, "↵").replace(/ /g, "·") : "?";
    return text.length > 11 ? `${text.slice(0, 10)}…` : text;
  }

  function renderScale(vmax) {
    const bar = $("colorbar").getContext("2d");
    LUT.forEach((rgb, i) => {
      bar.fillStyle = `rgb(${rgb})`;
      bar.fillRect(i, 0, 1, 12);
    });
    const hi = vmax.toPrecision(3);
    $("scale-lo").textContent = state.logScale ? `${(vmax / 10 ** DECADES).toPrecision(2)} (log)` : "0";
    $("scale-hi").textContent = state.hideSink ? `${hi} (first-token sink left out, grey)` : hi;
  }

  function renderHeads() {
    const box = $("heads");
    const heads = state.model ? state.model.num_heads : 0;
    $("heads-layer").textContent = String(state.layer);
    while (box.children.length < heads) box.appendChild(headFigure(box.children.length));
    for (let h = 0; h < heads; h++) {
      const figure = box.children[h];
      paint(figure.firstChild, matrix(state.layer, h), 1); // each head on its own scale
      figure.classList.toggle("selected", state.head === h);
    }
  }

  function headFigure(h) {
    const figure = document.createElement("figure");
    figure.appendChild(document.createElement("canvas"));
    const caption = document.createElement("figcaption");
    caption.textContent = `head ${h}`;
    figure.appendChild(caption);
    figure.addEventListener("click", () => selectHead(h));
    return figure;
  }

  function renderTokens() {
    const box = $("tokens");
    while (box.children.length > state.tokens.length) box.lastChild.remove();
    while (box.children.length < state.tokens.length) box.appendChild(tokenSpan(box.children.length));
    const focus = focusRow();
    const rows = state.layers.get(state.layer) || [];
    const row = focus === null ? null : rows[focus];
    let vmax = 0;
    shadeSpans(box.children, row ? rowView(row, state.head) : null);
    for (let i = 0; i < box.children.length; i++) {
      box.children[i].classList.toggle("focus", i === state.hover);
      box.children[i].classList.toggle("pinned", i === state.pinned);
    }
  }

  // Shades token spans by one row's weights (strongest 0.9 opaque); keys a top-k row did not keep
  // stay plain and carry no weight.
  function shadeSpans(spans, view) {
    let vmax = 0;
    if (view) for (let k = state.hideSink ? 1 : 0; k < view.length; k++) if (view[k] > vmax) vmax = view[k];
    for (let i = 0; i < spans.length; i++) {
      const span = spans[i];
      let shade = "";
      delete span.dataset.weight;
      if (view && i < view.length && !Number.isNaN(view[i])) {
        const v = view[i];
        span.dataset.weight = v;
        const sink = state.hideSink && i === 0;
        shade = sink ? "rgba(150,150,150,0.45)" : `rgba(232,89,12,${(0.9 * norm(v, vmax || 1)).toFixed(3)})`;
      }
      span.style.background = shade;
    }
  }

  function tokenSpan(i) {
    const t = state.tokens[i];
    const span = document.createElement("span");
    span.className = `tok ${t.prompt ? "prompt" : "gen"}${t.special ? " special" : ""}`;
    span.textContent = t.special ? t.text : t.text.replace(/\n/g, "↵\n");
    span.title = `#${i} ${JSON.stringify(t.text)}`;
    span.addEventListener("mouseenter", () => { state.hover = i; scheduleRender(); });
    span.addEventListener("mouseleave", () => { state.hover = null; scheduleRender(); });
    span.addEventListener("click", () => { state.pinned = state.pinned === i ? null : i; scheduleRender(); });
    return span;
  }

  function renderBytes() {
    const fetched = [...state.layers.keys()].sort((a, b) => a - b).join(", ") || "none";
    const kib = (n) => `${(n / 1024).toFixed(1)} KiB`;
    $("bytes").textContent =
      `attention weights${state.attnTopK ? " and top-k positions" : ""} received for this text: ` +
      `${state.bytes.toLocaleString()} bytes (${kib(state.bytes)}) in ` +
      `${state.rowsReceived} rows${state.dtypes.size ? ` of ${[...state.dtypes].join("/")}` : ""} · ` +
      `layers fetched: ${fetched} · since the page opened: ${kib(state.totalBytes)}`;
    $("bytes").dataset.bytes = state.bytes;
    for (const option of $("layer").options) {
      option.textContent = `${option.value}${state.layers.has(Number(option.value)) ? " ●" : ""}`;
    }
  }

  function focusRow() {
    return state.pinned !== null ? state.pinned : state.hover;
  }

  function scheduleRender() {
    if (state.frame) return;
    state.frame = requestAnimationFrame(() => {
      state.frame = 0;
      renderTokens();
      renderHeatmap();
      renderHeads();
      renderBytes();
    });
  }

  // ------------------------------------------------------------------ generation
  function setState(name, message) {
    document.body.dataset.state = name;
    $("status").textContent = message || "";
  }

  function setBusy(busy) {
    state.busy = busy;
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("layer").disabled = busy;
    if (!busy) state.abort = null;
  }

  function isSpecial(text) {
    return SPECIAL.test(text);
  }

  function resetSequence(tokenized) {
    state.tokens = tokenized.tokens.map((text) => ({ text, prompt: true, special: isSpecial(text) }));
    state.promptIds = tokenized.token_ids;
    state.promptLen = tokenized.token_ids.length;
    state.genIds = null;
    state.layers = new Map();
    state.bytes = 0;
    state.rowsReceived = 0;
    state.hover = null;
    state.pinned = null;
    $("tokens").replaceChildren();
  }

  // One generated token per logprobs entry (its exact text); a chunk without them counts as one token.
  function onGenerated(choice, mode) {
    if (choice.attention) choice.attention.forEach(storeRow);
    const text = mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
    const lp = choice.logprobs;
    const entries = lp ? (mode === "chat" ? lp.content || [] : lp.tokens || []) : [];
    const texts = entries.map((e) => (typeof e === "string" ? e : e.token));
    if (!texts.length && text) texts.push(text);
    for (const t of texts) state.tokens.push({ text: t, prompt: false, special: isSpecial(t) });
    return text;
  }

  async function send(event) {
    event.preventDefault();
    const text = $("prompt").value;
    if (state.busy || !text.trim()) return;
    state.abort = new AbortController();
    setBusy(true);
    let reply = "";
    const mode = state.mode;
    const input = promptInput(mode, text);
    try {
      if (!state.model) await loadModel();
      setState("streaming", "tokenizing…");
      resetSequence(await (await api("/tokenize", input)).json());
      setState("streaming", "generating…");
      state.attnTopK = Math.max(0, Math.floor(numberIn("attn-top-k", 0)));
      const body = { ...input, ...sampling(), stream: true, attention: attentionAsk(state.layer) };
      Object.assign(body, mode === "chat" ? { logprobs: true, top_logprobs: 0 } : { logprobs: 0 });
      const path = completionPath(mode);
      await readEvents(await api(path, body), (choice) => { reply += onGenerated(choice, mode); });
      setState("done", `${state.tokens.length - state.promptLen} tokens generated`);
    } catch (e) {
      if (e.name === "AbortError") setState("done", "stopped");
      else setState("error", e.message);
    } finally {
      if (mode === "chat" && reply) state.messages = [...input.messages, { role: "assistant", content: reply }];
      setBusy(false);
      scheduleRender();
    }
  }

  // ------------------------------------------------------------------ another layer
  async function specialsPrefix() {
    if (state.specialsPrefix === null) {
      try {
        state.specialsPrefix = (await (await api("/tokenize", { prompt: "" })).json()).token_ids;
      } catch {
        state.specialsPrefix = [];
      }
    }
    return state.specialsPrefix;
  }

  // The ids of every token but the last (the queries of the rows shown): the prompt's from /tokenize,
  // the reply's by re-tokenizing its text. Where that splits the reply differently, the page shows
  // the re-tokenized sequence (and forgets the rows of the old split).
  async function queryIds() {
    const gen = state.tokens.slice(state.promptLen, -1);
    if (!gen.length) return state.promptIds.slice(0, state.tokens.length - 1);
    if (!state.genIds) {
      const prefix = await specialsPrefix();
      const tok = await (await api("/tokenize", { prompt: gen.map((t) => t.text).join("") })).json();
      const skip = prefix.every((id, i) => tok.token_ids[i] === id) ? prefix.length : 0;
      const ids = tok.token_ids.slice(skip);
      const texts = tok.tokens.slice(skip);
      if (ids.length !== gen.length || texts.some((t, i) => t !== gen[i].text)) {
        const last = state.tokens[state.tokens.length - 1];
        state.tokens = [...state.tokens.slice(0, state.promptLen),
          ...texts.map((t) => ({ text: t, prompt: false, special: isSpecial(t) })), last];
        state.layers = new Map();
        $("tokens").replaceChildren();
      }
      state.genIds = ids;
    }
    return [...state.promptIds, ...state.genIds];
  }

  async function fetchLayer(layer) {
    if (state.busy || state.tokens.length < 2 || rowCount(layer) >= state.tokens.length - 1) return;
    state.abort = new AbortController();
    setBusy(true);
    setState("fetching", `fetching layer ${layer}…`);
    try {
      const ids = await queryIds();
      const body = { prompt: ids, max_tokens: 1, temperature: 0, stream: true, attention: attentionAsk(layer) };
      await readEvents(await api("/v1/completions", body), (choice) => (choice.attention || []).forEach(storeRow));
      setState("done", `layer ${layer}: ${rowCount(layer)} rows`);
    } catch (e) {
      if (e.name === "AbortError") setState("done", "stopped");
      else setState("error", e.message);
    } finally {
      setBusy(false);
      scheduleRender();
    }
  }


  // ------------------------------------------------------------------ one greedy run, whole
  // The generated tokens of a non-streamed choice: [{id, text}], ids from return_token_ids and
  // texts from the logprobs entries (one per token).
  function generatedTokens(choice, mode) {
    const lp = choice.logprobs || {};
    const texts = mode === "chat" ? (lp.content || []).map((e) => e.token) : lp.tokens || [];
    const ids = choice.token_ids || [];
    return ids.map((id, i) => ({ id, text: texts[i] === undefined ? "?" : texts[i] }));
  }

  // A greedy run of the prompt box (max tokens from the sampling box) with extra body fields.
  async function greedyRun(extra, signal) {
    const text = $("prompt").value;
    if (!text.trim()) throw new Error("type a prompt first");
    if (!state.model) await loadModel();
    const mode = state.mode;
    const input = promptInput(mode, text);
    const body = { ...input, max_tokens: numberIn("max-tokens", 16), temperature: 0, return_token_ids: true, ...extra };
    Object.assign(body, mode === "chat" ? { logprobs: true, top_logprobs: 0 } : { logprobs: 0 });
    const reply = await (await api(completionPath(mode), body, signal)).json();
    const choice = reply.choices[0];
    return { input, mode, choice, promptLen: reply.usage.prompt_tokens, tokens: generatedTokens(choice, mode) };
  }

  function visible(text) {
    return text.replace(/\n/g, "↵").replace(/ /g, "·") || "∅";
  }

  // ------------------------------------------------------------------ logit lens
  // One request: the lens of every layer at every generated token; a grid of layers (the last on
  // top, next to the tokens the model chose) x generated tokens, each cell its top token shaded by
  // its probability. The last layer's lens is the model's own distribution, so under greedy
  // decoding its top tokens are the generated ones (cells that agree are marked).
  async function runLens() {
    const section = $("lens");
    if (section.dataset.state === "running") return;
    section.dataset.state = "running";
    $("lens-run").disabled = true;
    $("lens-status").textContent = "running…";
    try {
      if (!state.model) await loadModel();
      const layers = Array.from({ length: state.model.num_layers }, (_, i) => i);
      const topK = Math.min(20, Math.max(1, Math.floor(numberIn("lens-top-k", 5))));
      const run = await greedyRun({ logit_lens: { layers, top_k: topK } });
      const lens = { layers, topK, promptLen: run.promptLen, tokens: run.tokens, cells: new Map() };
      for (const r of run.choice.logit_lens || []) lens.cells.set(`${r.layer}:${r.position}`, r);
      state.lens = lens;
      renderLens(lens);
      $("lens-status").textContent =
        `${layers.length} layers × ${run.tokens.length} tokens · ${(run.choice.logit_lens || []).length} lens rows`;
      section.dataset.state = "done";
    } catch (e) {
      $("lens-status").textContent = e.message;
      section.dataset.state = "error";
    } finally {
      $("lens-run").disabled = false;
    }
  }

  function renderLens(lens) {
    const table = $("lens-grid");
    const head = document.createElement("thead");
    const top = head.insertRow();
    const corner = document.createElement("th");
    corner.scope = "col";
    corner.textContent = "layer \\ token";
    top.appendChild(corner);
    lens.tokens.forEach((t, i) => {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = visible(t.text);
      th.title = `generated token ${i} (position ${lens.promptLen + i}): ${JSON.stringify(t.text)}`;
      Object.assign(th.dataset, { col: i, tokenId: t.id });
      top.appendChild(th);
    });
    const body = document.createElement("tbody");
    for (const layer of [...lens.layers].reverse()) {
      const tr = body.insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = String(layer);
      tr.appendChild(th);
      lens.tokens.forEach((t, i) => {
        const position = lens.promptLen - 1 + i;
        const r = lens.cells.get(`${layer}:${position}`);
        const td = tr.insertCell();
        td.className = "lens-cell";
        td.tabIndex = -1;
        Object.assign(td.dataset, { layer, col: i, position });
        if (!r) {
          td.textContent = "·";
          return;
        }
        const p = r.probs[0];
        td.textContent = visible(r.tokens[0]);
        td.style.background = `rgba(59,91,219,${(0.08 + 0.85 * p).toFixed(3)})`;
        td.classList.toggle("dark", p > 0.5);
        td.classList.toggle("match", r.token_ids[0] === t.id);
        Object.assign(td.dataset, { token: r.tokens[0], tokenId: r.token_ids[0], prob: p });
        td.title = `layer ${layer}, position ${position} (predicts generated token ${i}):\n` +
          r.tokens.map((tok, j) => `${JSON.stringify(tok)} ${r.probs[j].toFixed(3)}`).join("\n");
        td.setAttribute("aria-label", `layer ${layer}, token ${i}: ${r.tokens[0]} ${(p * 100).toFixed(0)}%`);
      });
    }
    table.replaceChildren(head, body);
    const first = table.querySelector("td.lens-cell");
    if (first) first.tabIndex = 0;
    Object.assign(table.dataset, { layers: lens.layers.length, cols: lens.tokens.length });
  }

  function describeLensCell(td) {
    if (!td || !td.dataset.token) return;
    $("lens-cell").textContent = td.title.replace(/\n/g, " · ");
  }

  // Arrow keys move through the grid (one tab stop for the whole grid).
  function onLensKey(event) {
    const td = event.target.closest("td.lens-cell");
    const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    if (!td || !moves[event.key]) return;
    const [dr, dc] = moves[event.key];
    const tr = td.parentElement;
    const rows = [...tr.parentElement.rows];
    const row = rows[rows.indexOf(tr) + dr];
    const next = row && row.cells[td.cellIndex + dc];
    if (!next || next.tagName !== "TD") return;
    event.preventDefault();
    td.tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  }

  // ------------------------------------------------------------------ two runs
  // "1:0,2; 3:1" -> [{layer: 1, heads: [0, 2], scale}, {layer: 3, heads: [1], scale}]
  function parseAblations(text, scale) {
    const m = state.model;
    const out = [];
    for (const part of text.split(";").map((p) => p.trim()).filter(Boolean)) {
      const match = /^(\d+)\s*:\s*(\d+(?:\s*,\s*\d+)*)$/.exec(part);
      if (!match) throw new Error(`ablate heads: "${part}" is not layer:head,head`);
      const layer = Number(match[1]);
      const heads = match[2].split(",").map(Number);
      if (layer >= m.num_layers) throw new Error(`ablate heads: layer ${layer} (the model has ${m.num_layers})`);
      const bad = heads.find((h) => h >= m.num_heads);
      if (bad !== undefined) throw new Error(`ablate heads: head ${bad} (the model has ${m.num_heads} per layer)`);
      out.push({ layer, heads, scale });
    }
    return out;
  }

  // A unit vector of hidden_size from a seed (mulberry32 and Box-Muller): the same seed, the same direction.
  function randomDirection(seed, size) {
    let a = seed >>> 0;
    const uniform = () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296;
    };
    const v = Array.from({ length: size }, () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform()));
    const length = Math.hypot(...v) || 1;
    return v.map((x) => x / length);
  }

  // Run B's extra body fields and a line saying what they are ({} and "plain" when none is set).
  function interventions() {
    const extra = {};
    const what = [];
    const ablateText = $("ablate").value.trim();
    if (ablateText) {
      const scale = numberIn("ablate-scale", 0);
      extra.ablations = parseAblations(ablateText, scale);
      what.push(`heads ${ablateText} ${scale === 0 ? "zeroed" : `scaled ×${scale}`}`);
    }
    if ($("steer-on").checked) {
      const layer = Number($("steer-layer").value);
      const seed = Math.floor(numberIn("steer-seed", 1));
      const scale = numberIn("steer-scale", 8);
      const point = $("steer-point").value;
      const positions = $("steer-positions").value;
      extra.steering = [{ layer, vector: randomDirection(seed, state.model.hidden_size), scale, point, positions }];
      what.push(`steered at layer ${layer} ${point} by ${scale} × random unit vector (seed ${seed}, ${positions} positions)`);
    }
    return { extra, what: what.join(" · ") || "plain" };
  }

  function firstDivergence(a, b) {
    const n = Math.min(a.length, b.length);
    for (let i = 0; i < n; i++) if (a[i].id !== b[i].id) return i;
    return a.length === b.length ? null : n;
  }

  async function runCompare() {
    const section = $("compare");
    if (section.dataset.state === "running") return;
    section.dataset.state = "running";
    $("compare-run").disabled = true;
    $("compare-status").textContent = "running both…";
    try {
      if (!state.model) await loadModel();
      const { extra, what } = interventions();
      const layer = Number($("compare-layer").value);
      const topK = Math.max(0, Math.floor(numberIn("attn-top-k", 0)));
      const attention = { layers: [layer], head_reduction: "mean", include_prompt: true, dtype: "float16" };
      if (topK > 0) attention.top_k = topK;
      const text = $("prompt").value;
      if (!text.trim()) throw new Error("type a prompt first");
      const prompt = await (await api("/tokenize", promptInput(state.mode, text), undefined)).json();
      // Both at once: the server batches them together, and batching never changes a run's tokens.
      const [a, b] = await Promise.all([greedyRun({ attention }), greedyRun({ attention, ...extra })]);
      const runs = [a, b].map((run) => {
        const rows = [];
        let bytes = 0;
        for (const r of run.choice.attention || []) {
          const decoded = decodeRow(r);
          rows[r.position] = decoded.row;
          bytes += decoded.bytes;
        }
        const texts = [...prompt.tokens, ...run.tokens.map((t) => t.text)];
        return { ...run, rows, bytes, texts };
      });
      const divergence = firstDivergence(a.tokens, b.tokens);
      state.compare = { layer, what, runs, divergence, promptLen: prompt.count, hover: [null, null] };
      renderCompare();
      section.dataset.divergence = divergence === null ? "none" : String(divergence);
      $("compare-status").textContent = "";
      section.dataset.state = "done";
    } catch (e) {
      $("compare-status").textContent = e.message;
      section.dataset.state = "error";
    } finally {
      $("compare-run").disabled = false;
    }
  }

  function renderCompare() {
    const c = state.compare;
    if (!c) return;
    const [a, b] = c.runs;
    const d = c.divergence;
    const tok = (run, i) => (run.tokens[i] ? JSON.stringify(run.tokens[i].text) : "(ended)");
    $("compare-summary").textContent = d === null
      ? `identical: both runs gave the same ${a.tokens.length} tokens (B: ${c.what})`
      : `the runs part at generated token ${d} (position ${c.promptLen + d}): A ${tok(a, d)} vs B ${tok(b, d)} · ` +
        `B: ${c.what}`;
    $("compare-summary").classList.toggle("parted", d !== null);
    document.querySelector("#run-b .run-what").textContent = c.what;
    let vmax = 0;
    const matrices = c.runs.map((run) => {
      let n = 0;
      while (run.rows[n]) n++;
      const m = matrixOf(run.rows, n, 0);
      vmax = Math.max(vmax, m.vmax);
      return m;
    });
    c.runs.forEach((run, r) => {
      const figure = $(r === 0 ? "run-a" : "run-b");
      const box = figure.querySelector(".run-tokens");
      const spans = run.texts.map((text, i) => {
        const span = document.createElement("span");
        const g = i - c.promptLen; // generated index, negative in the prompt
        span.className = `tok ${g < 0 ? "prompt" : "gen"}${isSpecial(text) ? " special" : ""}`;
        if (g >= 0) span.dataset.gen = g;
        if (d !== null && g >= d) span.classList.add("diverged");
        if (d !== null && g === d) {
          span.classList.add("divergence");
          span.setAttribute("aria-label", `${text}: the first token where the runs differ`);
        }
        span.textContent = isSpecial(text) ? text : text.replace(/\n/g, "↵\n");
        span.title = `#${i} ${JSON.stringify(text)}${g >= 0 ? ` (generated ${g})` : ""}`;
        span.tabIndex = 0;
        const focus = () => { c.hover[r] = i; shadeRun(r); };
        span.addEventListener("mouseenter", focus);
        span.addEventListener("focus", focus);
        return span;
      });
      box.replaceChildren(...spans);
      box.dataset.tokens = run.tokens.length;
      if (d !== null && d >= run.tokens.length) {
        const end = document.createElement("span");
        end.className = "tok divergence ended";
        end.textContent = "⏹ ended";
        box.appendChild(end);
      }
      const m = matrices[r];
      const canvas = figure.querySelector(".run-map");
      const cell = m.n ? Math.max(1, Math.min(8, Math.floor(360 / m.n))) : 1;
      paint(canvas, { ...m, vmax }, cell);
      Object.assign(canvas.dataset, { rows: m.n, cell, layer: c.layer });
      if (d !== null && c.promptLen + d < m.n) { // the row of the first token that differs
        const ctx = canvas.getContext("2d");
        ctx.fillStyle = "#c92a2a";
        ctx.fillRect(0, (c.promptLen + d) * cell, canvas.width, 1);
      }
      figure.querySelector(".run-cell").textContent =
        `layer ${c.layer}, mean of heads, ${run.bytes.toLocaleString()} bytes · hover a token for its row`;
    });
  }

  function shadeRun(r) {
    const c = state.compare;
    const run = c.runs[r];
    const figure = $(r === 0 ? "run-a" : "run-b");
    const spans = figure.querySelector(".run-tokens").children;
    const q = c.hover[r];
    const row = q === null ? null : run.rows[q];
    shadeSpans(spans, row ? rowView(row, 0) : null);
    for (let i = 0; i < spans.length; i++) spans[i].classList.toggle("focus", i === q);
    figure.querySelector(".run-cell").textContent = row
      ? `query ${q} ${JSON.stringify(run.texts[q])} reads (layer ${c.layer}, mean of heads)`
      : `query ${q} ${q === null ? "" : JSON.stringify(run.texts[q])}: the last token has no row`;
  }

  // ------------------------------------------------------------------ controls
  function fillSelectors() {
    const m = state.model;
    $("layer").replaceChildren(...Array.from({ length: m.num_layers }, (_, i) => new Option(String(i), String(i))));
    $("layer").value = String(state.layer);
    const heads = [new Option("mean of heads", "mean"), new Option("max of heads", "max")];
    for (let h = 0; h < m.num_heads; h++) heads.push(new Option(`head ${h}`, String(h)));
    $("head").replaceChildren(...heads);
    $("head").value = String(state.head);
    for (const id of ["steer-layer", "compare-layer"]) {
      $(id).replaceChildren(...Array.from({ length: m.num_layers }, (_, i) => new Option(String(i), String(i))));
    }
    $("steer-layer").value = String(Math.floor(m.num_layers / 2));
    $("compare-layer").value = String(m.num_layers - 1);
  }

  function selectHead(head) {
    state.head = head;
    $("head").value = String(head);
    scheduleRender();
  }

  function onHeatmapPointer(event, pin) {
    const canvas = $("heatmap");
    const n = Number(canvas.dataset.rows || 0);
    const box = canvas.getBoundingClientRect();
    const q = Math.floor(((event.clientY - box.top) / box.height) * n);
    const k = Math.floor(((event.clientX - box.left) / box.width) * n);
    if (!(q >= 0 && q < n && k >= 0 && k < n)) return;
    const row = state.layers.get(state.layer)[q];
    const label = (i) => JSON.stringify(state.tokens[i] ? state.tokens[i].text : "?");
    const v = k > q ? 0 : cellValue(row, k, state.head);
    $("cell").textContent = k > q ? `query ${q} ${label(q)} cannot see key ${k} (later token)`
      : `query ${q} ${label(q)} → key ${k} ${label(k)}: ` +
        `${Number.isNaN(v) ? "not among the row's top-k" : v.toFixed(4)} (layer ${state.layer}, head ${state.head})`;
    if (pin) state.pinned = state.pinned === q ? null : q;
    else state.hover = q;
    scheduleRender();
  }

  function bindControls() {
    $("prompt-form").addEventListener("submit", send);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("prompt-form").requestSubmit();
    });
    $("stop").addEventListener("click", () => state.abort && state.abort.abort());
    $("new-chat").addEventListener("click", () => {
      state.messages = [];
      setState("idle", "new conversation");
    });
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", () => { state.mode = radio.value; state.messages = []; });
    }
    $("layer").addEventListener("change", () => {
      state.layer = Number($("layer").value);
      scheduleRender();
      fetchLayer(state.layer);
    });
    $("head").addEventListener("change", () => {
      const v = $("head").value;
      selectHead(v === "mean" || v === "max" ? v : Number(v));
    });
    $("hide-sink").addEventListener("change", () => { state.hideSink = $("hide-sink").checked; scheduleRender(); });
    $("log-scale").addEventListener("change", () => { state.logScale = $("log-scale").checked; scheduleRender(); });
    $("heatmap").addEventListener("mousemove", (e) => onHeatmapPointer(e, false));
    $("heatmap").addEventListener("click", (e) => onHeatmapPointer(e, true));
    $("heatmap").addEventListener("mouseleave", () => { state.hover = null; scheduleRender(); });
    $("lens-run").addEventListener("click", runLens);
    $("lens-grid").addEventListener("keydown", onLensKey);
    $("lens-grid").addEventListener("mouseover", (e) => describeLensCell(e.target.closest("td.lens-cell")));
    $("lens-grid").addEventListener("focusin", (e) => describeLensCell(e.target.closest("td.lens-cell")));
    $("compare-run").addEventListener("click", runCompare);
  }

  async function init() {
    bindControls();
    state.hideSink = $("hide-sink").checked;
    state.logScale = $("log-scale").checked;
    try {
      await loadModel();
      setState("idle", "ready");
    } catch (e) {
      setState("error", `cannot read the model (${e.message}); an API key may be needed`);
    }
    scheduleRender();
  }

  init();
})();
