// The page of `python -m serve --http-port`: every figure it shows comes from the server's own
// JSON routes (/v1/models, /v1/models/NAME:classify, /v1/latency), as any client would get it.
"use strict";

const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);
let models = [];

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function getJSON(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(`${response.status}: ${body.error || response.statusText}`);
  return body;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

const ms = (us) => (Number(us) / 1000).toFixed(2);

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModels() {
  try {
    const answer = await getJSON("/v1/models", { headers: headers() });
    models = answer.models;
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren();
    for (const m of models) {
      const option = document.createElement("option");
      option.value = `${m.name}:${m.version}`;
      option.textContent = `${m.name}:${m.version}` + (m.isDefault ? " (default)" : "");
      select.appendChild(option);
    }
    if (chosen) select.value = chosen;
    const body = $("models").tBodies[0];
    body.replaceChildren();
    for (const m of models) {
      const row = body.insertRow();
      cell(row, m.name);
      cell(row, m.version);
      cell(row, m.inputSize.join("×"));
      cell(row, m.labels.length);
      cell(row, m.norm);
      cell(row, m.precision);
      cell(row, m.provider);
      cell(row, m.source);
    }
    $("server").textContent = `${models.length} model(s) served`;
  } catch (e) {
    setStatus("cannot list the models: " + e.message, true);
  }
}

function showResult(answer) {
  const list = $("classes");
  list.replaceChildren();
  const best = answer.classes.length ? answer.classes[0].score : 1;
  answer.classes.forEach((c, i) => {
    const item = document.createElement("li");
    item.dataset.rank = String(i + 1);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = c.label;
    label.title = `class ${c.index}`;
    const track = document.createElement("div");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * c.score / (best || 1)).toFixed(1)}%`;
    track.appendChild(bar);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = c.score.toFixed(4);
    item.append(label, track, score);
    list.appendChild(item);
  });
  const t = answer.timing;
  const body = $("timing").tBodies[0];
  body.replaceChildren();
  for (const [name, key] of [["decode", "decodeUs"], ["preprocess", "preprocessUs"], ["queue", "queueUs"],
                             ["inference", "inferenceUs"], ["total", "totalUs"]]) {
    const row = body.insertRow();
    row.dataset.part = name;
    cell(row, name);
    cell(row, ms(t[key]));
  }
  $("served-by").textContent =
    `${answer.model}:${answer.version} on ${answer.provider}, in a batch of ${answer.batchSize}`;
  $("result").hidden = false;
}

async function classify(file) {
  if (!file) return;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const model = $("model").value;
  const topK = Math.max(1, parseInt($("top-k").value, 10) || 5);
  setStatus(`classifying ${file.name} with ${model}…`);
  $("result").hidden = true;
  try {
    const answer = await getJSON(`/v1/models/${encodeURIComponent(model)}:classify?top_k=${topK}`, {
      method: "POST", body: file, headers: headers({ "Content-Type": file.type || "application/octet-stream" }),
    });
    showResult(answer);
    setStatus(`${file.name}: ${answer.classes[0].label}`);
    refreshLatency();
  } catch (e) {
    setStatus(e.message, true);
  }
}

function drawChart(rows) {
  const canvas = $("latency-chart");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 48, bottom = 36, top = 12;
  g.clearRect(0, 0, w, h);
  g.font = "12px system-ui, sans-serif";
  const series = [["p50", "#2f6fdb"], ["p90", "#7aa3ea"], ["p99", "#c3d4f5"]];
  const most = Math.max(1e-3, ...rows.flatMap((r) => [r.p50, r.p90, r.p99]));
  g.strokeStyle = "#d9dde5";
  g.fillStyle = "#5b6475";
  for (let i = 0; i <= 4; i++) {
    const y = top + (h - top - bottom) * (1 - i / 4);
    g.beginPath(); g.moveTo(left, y); g.lineTo(w, y); g.stroke();
    g.fillText((most * i / 4).toFixed(1), 4, y + 4);
  }
  const slot = (w - left) / Math.max(rows.length, 1);
  const bar = Math.min(28, slot / 4);
  rows.forEach((r, i) => {
    const x0 = left + i * slot + (slot - 3 * bar) / 2;
    series.forEach(([key, color], j) => {
      const height = (h - top - bottom) * r[key] / most;
      g.fillStyle = color;
      g.fillRect(x0 + j * bar, h - bottom - height, bar - 2, height);
    });
    g.fillStyle = "#1d2330";
    g.fillText(r.model, left + i * slot + 4, h - bottom + 16, slot - 8);
  });
  series.forEach(([key, color], j) => {
    g.fillStyle = color;
    g.fillRect(w - 150 + j * 50, h - 14, 10, 10);
    g.fillStyle = "#1d2330";
    g.fillText(key, w - 136 + j * 50, h - 5);
  });
}

async function refreshLatency() {
  try {
    const report = await getJSON("/v1/latency", { headers: headers() });
    const body = $("latency").tBodies[0];
    body.replaceChildren();
    const rows = [];
    for (const m of report.models) {
      const row = body.insertRow();
      row.dataset.model = m.model;
      cell(row, m.model);
      cell(row, m.totalRequests);
      cell(row, ms(m.total.p50Us));
      cell(row, ms(m.total.p90Us));
      cell(row, ms(m.total.p99Us));
      cell(row, Number(m.meanBatchSize).toFixed(2));
      rows.push({ model: m.model, p50: m.total.p50Us / 1000, p90: m.total.p90Us / 1000, p99: m.total.p99Us / 1000 });
    }
    drawChart(rows);
  } catch (e) {
    // the classify panel says what is wrong (a token, a stopped server); the chart just waits
  }
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => classify(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classify(e.dataTransfer.files[0]);
  });
  $("token").addEventListener("change", () => { loadModels(); refreshLatency(); });
  loadModels().then(refreshLatency);
  setInterval(refreshLatency, REFRESH_MS);
}

setUp();
