// The page of `aikd serve`: photos in (picked, dropped or taken with the webcam), POST /v1/quality, each photo drawn
// with its face boxes and landmarks, the aligned crop the model saw, the quality, the expected FNMR and the decision.
// Plain JS, no dependency, nothing loaded from elsewhere. Each card records what it drew in data-* attributes
// (data-quality, data-boxes), so a test can read the page as a person sees it.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = { accept: "#1f9d55", reject: "#d64545", none: "#2f6fde", landmark: "#ffd400" };
const CANVAS_WIDTH = 640;
let cardCount = 0;

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function describeModel() {
  try {
    const response = await fetch("/v1/model", { headers: headers() });
    const info = await response.json();
    if (response.status === 401) {
      $("key-row").classList.add("wanted");
      $("model").textContent = "This server needs an API key: enter it below.";
      return;
    }
    if (!response.ok) throw new Error(info.error ? info.error.message : response.statusText);
    $("key-row").classList.remove("wanted");
    const model = info.model;
    const parts = [`${model.architecture || "model"} ${model.precision} on ${model.backend}`,
      `fingerprint ${String(model.model).slice(0, 12)}`];
    if (info.calibration) parts.push(`calibrated at FMR ${info.calibration.fmr}`);
    else parts.push("not calibrated (raw quality only)");
    if (info.decision) parts.push(`decision: ${info.decision.rule} (${Number(info.decision.threshold).toPrecision(4)})`);
    if (!info.detect.available) {
      $("detect").checked = false;
      $("detect").disabled = true;
      parts.push("face detection not installed");
    } else {
      $("detect").checked = true;
    }
    $("model").textContent = parts.join(" · ");
  } catch (error) {
    $("model").textContent = `Could not read the model description: ${error.message}`;
  }
}

function figuresTable(face) {
  const table = document.createElement("table");
  table.className = "figures";
  const row = (label, value) => {
    const tr = table.insertRow();
    const th = document.createElement("th");
    th.textContent = label;
    tr.appendChild(th);
    const td = tr.insertCell();
    if (value instanceof Node) td.appendChild(value); else td.textContent = value;
  };
  row("quality", face.quality === null ? "—" : face.quality.toFixed(4));
  if (face.expected_fnmr !== undefined) row("expected FNMR", `${(100 * face.expected_fnmr).toFixed(2)} %`);
  if (face.quality_100 !== undefined) {
    const span = document.createElement("span");
    span.textContent = String(face.quality_100);
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${face.quality_100}%`;
    bar.appendChild(fill);
    span.appendChild(bar);
    row("quality 0–100", span);
  }
  if (face.decision) {
    const badge = document.createElement("span");
    badge.className = `badge ${face.decision}`;
    badge.textContent = face.decision;
    row("decision", badge);
  }
  if (face.detector_score !== null && face.detector_score !== undefined) row("detector", face.detector_score.toFixed(3));
  return table;
}

function drawFaces(canvas, bitmap, result) {
  const scale = CANVAS_WIDTH / Math.max(1, bitmap.width);
  canvas.width = CANVAS_WIDTH;
  canvas.height = Math.round(bitmap.height * scale);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  // The server's pixels are the photo after its EXIF orientation, as the browser draws it.
  const toCanvas = result.width ? canvas.width / result.width : scale;
  const drawn = [];
  for (const face of result.faces) {
    const colour = COLOURS[face.decision || "none"];
    if (face.box) {
      const [x1, y1, x2, y2] = face.box.map((v) => v * toCanvas);
      context.lineWidth = 4;
      context.strokeStyle = colour;
      context.strokeRect(x1, y1, x2 - x1, y2 - y1);
      drawn.push([Math.round(x1), Math.round(y1), Math.round(x2), Math.round(y2), colour]);
      if (face.quality !== null) {
        const label = face.quality.toFixed(3);
        context.font = "bold 16px system-ui, sans-serif";
        const width = context.measureText(label).width + 10;
        context.fillStyle = colour;
        context.fillRect(x1 - 2, Math.max(0, y1 - 24), width, 22);
        context.fillStyle = "#fff";
        context.fillText(label, x1 + 3, Math.max(16, y1 - 7));
      }
    }
    if (face.landmarks) {
      context.fillStyle = COLOURS.landmark;
      for (const [x, y] of face.landmarks) {
        context.beginPath();
        context.arc(x * toCanvas, y * toCanvas, 4, 0, 2 * Math.PI);
        context.fill();
      }
    }
  }
  canvas.dataset.boxes = JSON.stringify(drawn);
  return drawn.length;
}

function showResult(card, bitmap, result) {
  const canvas = card.querySelector("canvas");
  const list = card.querySelector(".faces");
  list.replaceChildren();
  if (result.error && result.faces.length === 0) {
    card.dataset.state = "error";
    card.dataset.error = result.error.code;
    const text = document.createElement("p");
    text.className = "error-text";
    text.textContent = `${result.error.code}: ${result.error.message}`;
    list.appendChild(text);
    return;
  }
  const boxes = drawFaces(canvas, bitmap, result);
  for (const face of result.faces) {
    const item = document.createElement("div");
    item.className = `face ${face.decision || ""}`;
    if (face.crop) {
      const img = document.createElement("img");
      img.src = face.crop;
      img.alt = "the face as the model sees it";
      item.appendChild(img);
    }
    item.appendChild(figuresTable(face));
    list.appendChild(item);
  }
  card.dataset.state = "done";
  card.dataset.quality = result.quality === null ? "" : String(result.quality);
  card.dataset.boxes = String(boxes);
  if (result.decision) card.dataset.decision = result.decision;
}

function newCard(name, bitmap) {
  const card = document.createElement("article");
  card.className = "card";
  card.id = `card-${cardCount++}`;
  card.dataset.name = name;
  card.dataset.state = "pending";
  const title = document.createElement("h2");
  title.textContent = name;
  const canvas = document.createElement("canvas");
  canvas.width = CANVAS_WIDTH;
  canvas.height = Math.round(bitmap.height * CANVAS_WIDTH / Math.max(1, bitmap.width));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  const faces = document.createElement("div");
  faces.className = "faces";
  faces.textContent = "scoring…";
  card.append(title, canvas, faces);
  return card;
}

async function score(files) {
  const images = files.filter((file) => file.type.startsWith("image/") || file.type === "");
  if (images.length === 0) return;
  const bitmaps = await Promise.all(images.map((file) => createImageBitmap(file).catch(() => null)));
  const cards = images.map((file, i) => newCard(file.name || `photo ${i + 1}`,
    bitmaps[i] || { width: 1, height: 1 }));
  $("results").prepend(...cards); // the newest photos first, in the order they were given
  const form = new FormData();
  images.forEach((file, i) => form.append("file", file, file.name || `photo-${i + 1}.png`));
  const query = new URLSearchParams({ detect: $("detect").checked, faces: $("faces").value, crops: "true" });
  say(`scoring ${images.length} photo(s)…`);
  const started = performance.now();
  try {
    const response = await fetch(`/v1/quality?${query}`, { method: "POST", body: form, headers: headers() });
    const body = await response.json();
    if (!body.results) {
      if (response.status === 401) $("key-row").classList.add("wanted");
      throw new Error(body.error ? `${body.error.code}: ${body.error.message}` : response.statusText);
    }
    body.results.forEach((result, i) => {
      if (bitmaps[i]) showResult(cards[i], bitmaps[i], result);
      else showResult(cards[i], bitmaps[i], { ...result, faces: [], error: result.error || { code: "browser", message: "the browser cannot show this image" } });
    });
    say(`${images.length} photo(s) scored in ${Math.round(performance.now() - started)} ms`);
  } catch (error) {
    cards.forEach((card) => {
      card.dataset.state = "error";
      card.querySelector(".faces").textContent = error.message;
    });
    say(error.message, true);
  }
}

function setUpDrop() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => {
    score([...event.target.files]);
    event.target.value = "";
  });
  ["dragenter", "dragover"].forEach((kind) => drop.addEventListener(kind, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((kind) => drop.addEventListener(kind, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    score([...event.dataTransfer.files]);
  });
}

function setUpWebcam() {
  // Browsers allow the webcam on https:// and on localhost only; elsewhere the button stays hidden.
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) return;
  const video = $("video");
  let stream = null;
  $("camera").hidden = false;
  $("camera").addEventListener("click", async () => {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: 1280, height: 720 }, audio: false });
      video.srcObject = stream;
      $("webcam").hidden = false;
    } catch (error) {
      say(`webcam: ${error.message}`, true);
    }
  });
  const close = () => {
    if (stream) stream.getTracks().forEach((track) => track.stop());
    stream = null;
    $("webcam").hidden = true;
  };
  $("stop").addEventListener("click", close);
  $("snap").addEventListener("click", () => {
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => {
      if (blob) score([new File([blob], `webcam-${new Date().toISOString().slice(11, 19)}.png`, { type: "image/png" })]);
    }, "image/png");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpDrop();
  setUpWebcam();
  $("key").addEventListener("change", describeModel);
  describeModel();
});
