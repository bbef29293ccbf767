// SPDX-License-Identifier: Apache-2.0
// The teleop page of `ego-ros web`: plain JavaScript, no build step, nothing loaded from elsewhere.
//
// The live view fetches the newest camera frame as JPEG, one after another (the next request leaves when the last
// frame is drawn, so a slow phone gets fewer frames, never a backlog). Touching or clicking it freezes the view on
// the frame shown and asks the server to hold that frame; the box drawn is in that frame's pixels, and the
// registration names that frame, so the node gets the very pixels the user saw. Recognition events come as
// Server-Sent Events; an answer streams back from the POST that asks it. Text from the robot (names, answers,
// messages) is only ever set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const canvas = $("live");
const context = canvas.getContext("2d");
const COLOURS = ["#ff4040", "#40c840", "#4080ff", "#ffbe00", "#c840ff", "#00c8c8"];
const EVENT_SHOWN_MS = 3000; // a recognition event's boxes fade out after this long without a new one
const MIN_BOX = 4; // frame pixels: anything smaller was a tap, not a box

let shown = null; // the frame on the canvas: {id, width, height, stamp, picture}
let frozen = null; // the frame held for a box or a search (the live view stops on it), else null
let drag = null; // {x, y} where the current drag started, in frame pixels
let box = null; // [x0, y0, x1, y1] in the frozen frame's pixels
let found = null; // {frame, detections} from "Find concepts in this frame"
let lastEvent = null; // the latest recognition event, and when it came
let lastEventAt = 0;
let asking = null; // the AbortController of the question being answered
window.egoAskLog = []; // what the answer stream delivered, in order, with times (performance.now())

// --- the API -------------------------------------------------------------------------------------------------

function headers(json) {
  const made = {};
  if (token) made["X-Ego-Token"] = token;
  if (json) made["Content-Type"] = "application/json";
  return made;
}

async function failure(response) {
  try {
    const body = await response.json();
    if (body && body.error) return new Error(body.error);
  } catch (ignored) { /* not JSON */ }
  return new Error(`the server answered ${response.status} ${response.statusText}`);
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers(false), cache: "no-store" });
  if (!response.ok) throw await failure(response);
  return response.json();
}

async function post(path, body, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  return response;
}

function tell(text, ok) {
  const box = $("message");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  box.hidden = false;
  clearTimeout(tell.timer);
  if (ok) tell.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- the live view -------------------------------------------------------------------------------------------

async function picture(blob) {
  if (window.createImageBitmap) return createImageBitmap(blob);
  const image = new Image();
  image.src = URL.createObjectURL(blob);
  await image.decode();
  URL.revokeObjectURL(image.src);
  return image;
}

async function liveLoop() {
  let after = 0;
  for (;;) {
    if (frozen) { await sleep(150); continue; }
    try {
      const response = await fetch(`/api/frame?after=${after}`, { headers: headers(false), cache: "no-store" });
      if (response.status === 204) continue;
      if (!response.ok) {
        $("view-note").textContent = (await failure(response)).message;
        await sleep(1000);
        continue;
      }
      const frame = {
        id: Number(response.headers.get("X-Frame-Id")), stamp: Number(response.headers.get("X-Frame-Stamp")),
        width: Number(response.headers.get("X-Frame-Width")), height: Number(response.headers.get("X-Frame-Height")),
        picture: await picture(await response.blob()),
      };
      after = frame.id;
      if (!frozen) {
        if (!shown) $("view-note").textContent = "Drag a box around an object to name it.";
        show(frame);
      }
    } catch (error) {
      $("view-note").textContent = `no camera frames: ${error.message}`;
      await sleep(1000);
    }
  }
}

function show(frame) {
  shown = frame;
  canvas.dataset.frame = String(frame.id);
  canvas.dataset.stamp = frame.stamp.toFixed(6);
  canvas.dataset.width = String(frame.width);
  draw();
}

// The canvas is as many device pixels as it shows (crisp labels on a phone), the frame drawn to fill it; boxes are
// kept in the frame's own pixels and scaled by k (canvas pixels per frame pixel) only to be drawn.
function fit() {
  const ratio = window.devicePixelRatio || 1;
  canvas.style.aspectRatio = `${shown.width} / ${shown.height}`;
  const width = Math.max(1, Math.round(canvas.getBoundingClientRect().width * ratio));
  const height = Math.max(1, Math.round((width * shown.height) / shown.width));
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  return { k: width / shown.width, ratio };
}

function label(text, x, y, colour, ratio) {
  context.font = `${Math.round(14 * ratio)}px system-ui, sans-serif`;
  const width = context.measureText(text).width + 8 * ratio;
  const height = 20 * ratio;
  const top = y >= height ? y - height : y;
  context.fillStyle = colour;
  context.fillRect(x, top, width, height);
  context.fillStyle = "#000";
  context.fillText(text, x + 4 * ratio, top + 15 * ratio);
}

function drawBoxes(detections, k, ratio) {
  detections.forEach((detection, i) => {
    if (!detection.box) return;
    const [x0, y0, x1, y1] = detection.box.map((v) => v * k);
    const colour = COLOURS[i % COLOURS.length];
    context.strokeStyle = colour;
    context.lineWidth = 3 * ratio;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    label(`${detection.name} ${detection.score.toFixed(2)}`, x0, y0, colour, ratio);
  });
}

function draw() {
  if (!shown) return;
  const { k, ratio } = fit();
  context.drawImage(shown.picture, 0, 0, canvas.width, canvas.height);
  if (found && found.frame === shown.id) {
    drawBoxes(found.detections, k, ratio);
  } else if (!frozen && lastEvent && performance.now() - lastEventAt < EVENT_SHOWN_MS) {
    drawBoxes(lastEvent.detections, k, ratio);
  }
  if (box) {
    const [x0, y0, x1, y1] = box.map((v) => v * k);
    context.setLineDash([8 * ratio, 5 * ratio]);
    context.strokeStyle = "#fff";
    context.lineWidth = 3 * ratio;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    context.setLineDash([]);
    context.strokeStyle = "#1f6feb";
    context.lineWidth = 1.5 * ratio;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
}
window.addEventListener("resize", draw);

function framePoint(event) { // in the shown frame's pixels, inside it
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * shown.width) / rect.width;
  const y = ((event.clientY - rect.top) * shown.height) / rect.height;
  return { x: Math.min(Math.max(x, 0), shown.width), y: Math.min(Math.max(y, 0), shown.height) };
}

async function freeze() {
  frozen = shown;
  canvas.dataset.frozen = String(frozen.id);
  $("resume").hidden = false;
  try {
    await post("/api/hold", { frame: frozen.id });
  } catch (error) {
    tell(`cannot keep this frame: ${error.message}`);
    resume();
  }
}

function resume() {
  frozen = null;
  box = null;
  drag = null;
  found = null;
  delete canvas.dataset.frozen;
  $("resume").hidden = true;
  $("register-form").hidden = true;
  $("view-note").textContent = "Drag a box around an object to name it.";
  draw();
}

// Pointer events are what mouse, pen and touch all send (touch-action: none in the CSS keeps a drag on the
// picture from scrolling the page on a phone).
canvas.addEventListener("pointerdown", (event) => {
  if (!shown) { tell("no camera frame yet: is the camera publishing?"); return; }
  if (event.button !== undefined && event.button > 0) return;
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  if (!frozen || frozen.id !== shown.id) freeze();
  found = null;
  const point = framePoint(event);
  drag = point;
  box = null;
  $("register-form").hidden = true;
});

canvas.addEventListener("pointermove", (event) => {
  if (!drag) return;
  event.preventDefault();
  const point = framePoint(event);
  box = [Math.min(drag.x, point.x), Math.min(drag.y, point.y), Math.max(drag.x, point.x), Math.max(drag.y, point.y)]
    .map(Math.round);
  draw();
});

function endDrag(event) {
  if (!drag) return;
  drag = null;
  if (event.type === "pointercancel" || !box || box[2] - box[0] < MIN_BOX || box[3] - box[1] < MIN_BOX) {
    box = null;
    draw();
    $("view-note").textContent = "Drag across the object to draw a box around it (a tap is not a box).";
    return;
  }
  const [x0, y0, x1, y1] = box;
  $("box-info").textContent = `Box ${x1 - x0}×${y1 - y0} px at (${x0}, ${y0}) on frame ${frozen.id}. ` +
    "What is it?";
  $("view-note").textContent = "The view is paused on the frame you drew on; Back to live drops the box.";
  $("register-form").hidden = false;
  $("name").focus();
  draw();
}
canvas.addEventListener("pointerup", endDrag);
canvas.addEventListener("pointercancel", endDrag);

$("resume").addEventListener("click", resume);

$("register-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!frozen || !box) { tell("draw a box on the camera first"); return; }
  const button = $("register");
  button.disabled = true;
  button.textContent = "Registering…";
  try {
    const response = await post("/api/register", {
      frame: frozen.id, box, name: $("name").value, description: $("description").value,
    });
    const result = await response.json();
    tell(result.message, true);
    $("name").value = "";
    $("description").value = "";
    resume();
    refreshConcepts();
  } catch (error) {
    tell(error.message); // the box and the frame stay: fix the name and register again
  } finally {
    button.disabled = false;
    button.textContent = "Register";
  }
});

$("find").addEventListener("click", async () => {
  const frame = frozen || shown;
  if (!frame) { tell("no camera frame yet: is the camera publishing?"); return; }
  if (!frozen) await freeze();
  const button = $("find");
  button.disabled = true;
  try {
    const result = await (await post("/api/recognize", { frame: frame.id })).json();
    found = { frame: result.frame, detections: result.detections };
    $("view-note").textContent = result.detections.length
      ? `In this frame: ${result.detections.map((d) => `${d.name} ${d.score.toFixed(2)}`).join(", ")}.`
      : "No concept recognised in this frame.";
    draw();
  } catch (error) {
    tell(error.message);
  } finally {
    button.disabled = false;
  }
});

// --- recognition events --------------------------------------------------------------------------------------

function listen() {
  const events = new EventSource(`/api/events${token ? `?token=${encodeURIComponent(token)}` : ""}`);
  events.addEventListener("recognition", (message) => {
    lastEvent = JSON.parse(message.data);
    lastEventAt = performance.now();
    const when = new Date(lastEvent.stamp * 1000).toLocaleTimeString();
    $("seen").textContent = lastEvent.detections.length
      ? `Seen at ${when}: ${lastEvent.detections.map((d) => `${d.name} ${d.score.toFixed(2)}`).join(", ")}`
      : `Seen at ${when}: none of the concepts.`;
    if (!frozen) draw();
  });
}
setInterval(() => { if (!frozen && lastEvent) draw(); }, 500); // fade boxes out when events stop

// --- ask -----------------------------------------------------------------------------------------------------

function parseEvents(buffer, handle) {
  let end;
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trim());
    }
    if (data.length) handle(name, JSON.parse(data.join("\n")));
  }
  return buffer;
}

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) { tell("type a question first"); return; }
  const answer = $("answer");
  answer.textContent = "";
  $("answer-info").textContent = "";
  window.egoAskLog = [];
  document.body.dataset.asking = "yes";
  asking = new AbortController();
  $("ask").disabled = true;
  $("stop").hidden = false;
  const frame = frozen || shown;
  try {
    const response = await post("/api/ask", { question, frame: frame ? frame.id : null }, asking.signal);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (name, data) => {
        window.egoAskLog.push({ kind: name, at: performance.now(), data });
        if (name === "text") {
          const piece = document.createElement("span");
          piece.textContent = data.text;
          answer.append(piece);
        } else if (name === "done") {
          answer.textContent = data.answer.trim() || "(the model gave an empty answer)";
          const context = data.concepts.length ? data.concepts.join(", ") : "none";
          $("answer-info").textContent = `concepts in context: ${context}; ${data.tokens ?? "?"} tokens in ` +
            `${data.latency.toFixed(1)} s${data.frame ? `, about frame ${data.frame}` : ""}`;
        } else if (name === "error") {
          tell(data.error);
        }
      });
    }
  } catch (error) {
    if (error.name !== "AbortError") tell(error.message);
    else $("answer-info").textContent = "stopped";
  } finally {
    asking = null;
    $("ask").disabled = false;
    $("stop").hidden = true;
    document.body.dataset.asking = "done";
  }
});

$("stop").addEventListener("click", () => { if (asking) asking.abort(); });

// --- concepts ------------------------------------------------------------------------------------------------

const pictures = new Map(); // "name\u0000updated" -> object URL

async function conceptPicture(concept, holder) {
  const key = `${concept.name}\u0000${concept.updated}`;
  let url = pictures.get(key);
  if (!url) {
    const query = new URLSearchParams({ name: concept.name, updated: String(concept.updated) });
    const response = await fetch(`/api/picture?${query}`, { headers: headers(false) });
    if (!response.ok) {
      holder.textContent = `(no picture: ${(await failure(response)).message})`;
      return;
    }
    url = URL.createObjectURL(await response.blob());
    pictures.set(key, url);
  }
  const image = document.createElement("img");
  image.alt = `what the memory of ${concept.name} kept`;
  image.src = url;
  holder.replaceChildren(image);
}

function forgetButton(name) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "danger";
  button.textContent = "Forget";
  button.addEventListener("click", async () => {
    if (!button.classList.contains("armed")) { // two taps: a stray touch does not forget anything
      button.classList.add("armed");
      button.textContent = "Really forget?";
      setTimeout(() => { button.classList.remove("armed"); button.textContent = "Forget"; }, 4000);
      return;
    }
    button.disabled = true;
    try {
      tell((await (await post("/api/forget", { name })).json()).message, true);
    } catch (error) {
      tell(error.message);
    }
    refreshConcepts();
  });
  return button;
}

function ago(seconds) { // "12 s", "5 min", "3 h", "2 days": one unit, as the command line says it
  for (const [limit, unit, size] of [[120, "s", 1], [7200, "min", 60], [172800, "h", 3600]]) {
    if (seconds < limit) return `${Math.round(seconds / size)} ${unit}`;
  }
  return `${Math.round(seconds / 86400)} days`;
}

function lastSeen(visit) { // "last seen 12 s ago, camera /camera/image_raw" beside the crop of that sighting
  const line = document.createElement("div");
  line.className = "last-seen";
  const words = document.createElement("span");
  if (!visit) {
    words.textContent = "not seen yet";
    line.append(words);
    return line;
  }
  if (visit.crop) {
    const crop = document.createElement("img");
    crop.src = visit.crop;
    crop.alt = "where it was last seen";
    line.append(crop);
  }
  const where = visit.camera ? `camera ${visit.camera}` : "in a sent image";
  words.textContent = `last seen ${ago(visit.ago)} ago, ${where} (score ${visit.score.toFixed(2)})`;
  line.append(words);
  return line;
}

async function refreshConcepts() {
  let concepts;
  try {
    concepts = (await getJson("/api/concepts")).concepts;
  } catch (error) {
    $("no-concepts").textContent = `Concepts unknown: ${error.message}`;
    $("no-concepts").hidden = false;
    return;
  }
  const list = $("concepts");
  const items = concepts.map((concept) => {
    const item = document.createElement("li");
    item.dataset.name = concept.name;
    const head = document.createElement("div");
    head.className = "head";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = concept.name;
    head.append(name, forgetButton(concept.name));
    const facts = document.createElement("p");
    facts.className = "note";
    const keywords = concept.keywords.length ? `; keywords: ${concept.keywords.join(", ")}` : "";
    facts.textContent = `${concept.views} view${concept.views === 1 ? "" : "s"}, ${concept.tokens} tokens, ` +
      `area ${concept.area}%${keywords}`;
    const holder = document.createElement("div");
    holder.className = "picture";
    item.append(head, facts, lastSeen(concept.last_seen), holder);
    conceptPicture(concept, holder);
    return item;
  });
  list.replaceChildren(...items);
  $("no-concepts").textContent = "No concepts yet: drag a box on the camera to name one.";
  $("no-concepts").hidden = concepts.length > 0;
}

// --- status --------------------------------------------------------------------------------------------------

async function refreshStatus() {
  const status = $("status");
  try {
    const state = await getJson("/api/status");
    const frame = state.frame ? `${state.frame.width}×${state.frame.height}, ${state.frame.age.toFixed(1)} s ago`
      : "no frame yet";
    status.textContent = `node ${state.node}: ${state.ready ? "ready" : "not running"} · ${state.camera}: ${frame}`;
    status.className = state.ready && state.frame && state.frame.age < 5 ? "status ok" : "status bad";
  } catch (error) {
    status.textContent = error.message;
    status.className = "status bad";
  }
}

refreshStatus();
setInterval(refreshStatus, 2000);
refreshConcepts();
setInterval(() => { if (!asking) refreshConcepts(); }, 15000);
listen();
liveLoop();
