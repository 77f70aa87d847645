// The clicklens search page.  It talks only to this server:
//   GET  /clicklens/page.json                        model names, signature and input/output names, and the
//                                                    upload limit (from clicklens/servables.py and the server's
//                                                    serving.max_request_bytes), read once before anything else
//   GET  /v1/models/<name>                           which version is AVAILABLE (TF Serving's REST API)
//   POST /v1/models/<name>/versions/<v>:predict      the text signature {query} or the image signature
//                                                    {image bytes: {b64}}, answering image ids and scores
//   GET  <images route><id>                          result thumbnails
// The search lives in the address (?q=..., ?image=<id>, &model=...), so a result page can be shared and reloaded.
"use strict";

const PAGE_SETTINGS_URL = "/clicklens/page.json";
const BOTH = "both";  // the "Compare both" choice: every retrieval model side by side

// Filled from PAGE_SETTINGS_URL by start(): retrieval_models, default_model, text_signature, image_signature,
// query_input, image_input, image_ids_output, scores_output, images_route, max_upload_bytes.
let settings = null;

const el = {
  form: document.getElementById("search"),
  q: document.getElementById("q"),
  upload: document.getElementById("upload"),
  models: document.getElementById("models"),
  message: document.getElementById("message"),
  results: document.getElementById("results"),
  queryImage: document.getElementById("query-image"),
  queryThumb: document.getElementById("query-thumb"),
  queryImageLabel: document.getElementById("query-image-label"),
};

let searchCounter = 0;  // a newer search makes the answers of older ones stale
let lastUpload = null;  // {buffer, label}: an uploaded image is not in the address, so keep it here

// ---------------------------------------------------------------------------
// Address <-> search

function readAddress() {
  const params = new URLSearchParams(window.location.search);
  const model = params.get("model");
  return {
    q: params.get("q"),
    image: params.get("image"),
    model: model === BOTH || settings.retrieval_models.includes(model) ? model : settings.default_model,
  };
}

function writeAddress(search, replace) {
  const params = new URLSearchParams();
  if (search.q !== null && search.q !== undefined) params.set("q", search.q);
  if (search.image) params.set("image", search.image);
  if (search.model !== settings.default_model) params.set("model", search.model);
  const query = params.toString();
  const url = "/" + (query ? "?" + query : "");
  if (url === window.location.pathname + window.location.search) return;
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
}

function selectedModel() {
  const checked = el.models.querySelector("input[name=model]:checked");
  return checked ? checked.value : settings.default_model;
}

function modelsFor(choice) {
  return choice === BOTH ? settings.retrieval_models.slice() : [choice];
}

// ---------------------------------------------------------------------------
// Messages and state (data-state on <body> lets tests and scripts wait for a search)

function setState(state) {
  document.body.dataset.state = state;
}

function showMessage(text, isError) {
  el.message.textContent = text || "";
  el.message.classList.toggle("error", Boolean(isError));
}

function clearResults() {
  el.results.replaceChildren();
}

function showQueryImage(src, label) {
  if (!src) {
    el.queryImage.hidden = true;
    el.queryThumb.removeAttribute("src");
    return;
  }
  el.queryThumb.src = src;
  el.queryThumb.alt = label;
  el.queryImageLabel.textContent = label;
  el.queryImage.hidden = false;
}

// ---------------------------------------------------------------------------
// The REST API

async function readJson(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch (err) {
    return { error: text.slice(0, 300) || response.statusText };
  }
}

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function fetchJson(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new ApiError("The server cannot be reached (" + err.message + "). Is `clicklens serve` running?", 0);
  }
  const body = await readJson(response);
  if (!response.ok) {
    throw new ApiError("The server answered " + response.status + ": " + (body.error || response.statusText),
                       response.status);
  }
  return body;
}

// The newest AVAILABLE version of a model, from TF Serving's model status.
async function availableVersion(model) {
  const status = await fetchJson("/v1/models/" + encodeURIComponent(model));
  const versions = (status.model_version_status || [])
    .filter((v) => v.state === "AVAILABLE")
    .map((v) => Number(v.version));
  if (!versions.length) {
    const states = (status.model_version_status || []).map((v) => "version " + v.version + " " + v.state);
    throw new ApiError(model + " has no AVAILABLE version yet" + (states.length ? " (" + states.join(", ") + ")" : ""), 503);
  }
  return Math.max(...versions);
}

// One predict call against an explicit version, so the page knows which version answered.
async function predict(model, instance, signature) {
  const version = await availableVersion(model);
  const body = JSON.stringify({ signature_name: signature, instances: [instance] });
  const started = performance.now();
  const answer = await fetchJson("/v1/models/" + encodeURIComponent(model) + "/versions/" + version + ":predict", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: body,
  });
  const latencyMs = performance.now() - started;
  const row = (answer.predictions || [])[0] || {};
  const ids = row[settings.image_ids_output] || [];
  const scores = row[settings.scores_output] || [];
  return { model, version, latencyMs, hits: ids.map((id, i) => ({ id: String(id), score: Number(scores[i]) })) };
}

// ---------------------------------------------------------------------------
// Rendering

function formatScore(score) {
  if (!Number.isFinite(score)) return String(score);
  return Number.isInteger(score) ? String(score) : score.toFixed(3);
}

function formatSize(bytes) {
  const mib = 1024 * 1024;
  return bytes >= mib ? (bytes / mib).toFixed(1) + " MiB" : Math.floor(bytes / 1024) + " KiB";
}

function imageUrl(id) {
  return settings.images_route + encodeURIComponent(id);
}

function renderPanel(model) {
  const panel = document.createElement("section");
  panel.className = "panel";
  panel.dataset.model = model;
  const title = document.createElement("h2");
  title.textContent = model;
  const info = document.createElement("p");
  info.className = "model-info";
  info.textContent = "searching…";
  panel.append(title, info);
  el.results.append(panel);
  return panel;
}

function panelMessage(panel, text, isError) {
  const p = document.createElement("p");
  p.className = "panel-message" + (isError ? " error" : "");
  p.textContent = text;
  panel.append(p);
}

function renderHits(panel, result, emptyText) {
  const info = panel.querySelector(".model-info");
  info.textContent = "version " + result.version + " · " + result.latencyMs.toFixed(0) + " ms · top " + result.hits.length;
  info.dataset.version = String(result.version);
  info.dataset.latencyMs = result.latencyMs.toFixed(1);
  if (!result.hits.length) {
    panelMessage(panel, emptyText, false);
    return;
  }
  const grid = document.createElement("ol");
  grid.className = "grid";
  result.hits.forEach((hit, i) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hit";
    button.dataset.imageId = hit.id;
    button.dataset.score = String(hit.score);
    button.title = "Find images like " + hit.id;
    const img = document.createElement("img");
    img.src = imageUrl(hit.id);
    img.alt = hit.id;
    img.width = 92;
    img.height = 92;
    img.addEventListener("error", () => button.classList.add("broken"));
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = "#" + (i + 1);
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = "score " + formatScore(hit.score);
    button.append(img, rank, id, score);
    button.addEventListener("click", () => searchByImageId(hit.id));
    item.append(button);
    grid.append(item);
  });
  panel.append(grid);
}

// In "compare both", mark the images both models returned and say how many.
function markShared(results) {
  if (results.length !== 2 || results.some((r) => !r)) return;
  const [a, b] = results.map((r) => new Set(r.hits.map((h) => h.id)));
  const shared = [...a].filter((id) => b.has(id));
  for (const button of el.results.querySelectorAll(".hit")) {
    button.classList.toggle("shared", shared.includes(button.dataset.imageId));
  }
  const k = Math.max(a.size, b.size);
  if (k) showMessage(shared.length + " of the top " + k + " images are returned by both models.", false);
}

// Runs one search on every selected model, side by side.
async function runSearch(instance, signature, models, emptyText) {
  const token = ++searchCounter;
  setState("loading");
  clearResults();
  showMessage("Searching…", false);
  const panels = models.map(renderPanel);
  const results = await Promise.all(models.map(async (model, i) => {
    try {
      return await predict(model, instance, signature);
    } catch (err) {
      if (token === searchCounter) {
        panels[i].querySelector(".model-info").textContent = "no answer";
        panelMessage(panels[i], err.message, true);
      }
      return null;
    }
  }));
  if (token !== searchCounter) return;
  results.forEach((result, i) => { if (result) renderHits(panels[i], result, emptyText); });
  const failed = results.filter((r) => !r).length;
  if (failed === results.length) {
    showMessage("The search failed: see the message below.", true);
    setState("error");
  } else if (results.every((r) => !r || !r.hits.length)) {
    showMessage(emptyText, false);
    setState("empty");
  } else {
    showMessage("", false);
    markShared(results);
    setState(failed ? "error" : "done");
  }
}

// ---------------------------------------------------------------------------
// The three ways to search

function searchText(text) {
  lastUpload = null;
  showQueryImage(null);
  const query = (text || "").trim();
  if (!query) {
    searchCounter++;
    clearResults();
    showMessage("Type a query to search (any language), or pick an image to find similar ones.", true);
    setState("empty-query");
    return Promise.resolve();
  }
  return runSearch({ [settings.query_input]: query }, settings.text_signature, modelsFor(selectedModel()),
                   "No images found for “" + query + "”.");
}

function bytesToBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

function searchImageBytes(buffer, label) {
  return runSearch({ [settings.image_input]: { b64: bytesToBase64(buffer) } }, settings.image_signature,
                   modelsFor(selectedModel()),
                   "No similar images found for " + label + ".");
}

async function searchImage(id) {
  lastUpload = null;
  el.q.value = "";
  showQueryImage(imageUrl(id), id);
  const token = ++searchCounter;
  setState("loading");
  let response;
  try {
    response = await fetch(imageUrl(id));
  } catch (err) {
    showMessage("The server cannot be reached (" + err.message + ").", true);
    setState("error");
    return;
  }
  if (token !== searchCounter) return;
  if (!response.ok) {
    const body = await readJson(response);
    clearResults();
    showQueryImage(null);
    showMessage("Cannot search by image " + id + ": " + (body.error || response.statusText), true);
    setState("error");
    return;
  }
  await searchImageBytes(await response.arrayBuffer(), id);
}

function searchByImageId(id) {
  writeAddress({ image: id, model: selectedModel() }, false);
  window.scrollTo(0, 0);
  return searchImage(id);
}

function searchUpload(file) {
  if (!file) return;
  // A file the server's request limit cannot carry is refused before sending.
  if (file.size > settings.max_upload_bytes) {
    showMessage(file.name + " is too large (" + Math.round(file.size / 1024) + " KiB); the limit is "
                + formatSize(settings.max_upload_bytes) + ".", true);
    setState("error");
    return;
  }
  el.q.value = "";
  writeAddress({ model: selectedModel() }, false);  // an uploaded file cannot live in the address
  showQueryImage(URL.createObjectURL(file), file.name);
  file.arrayBuffer().then((buffer) => {
    lastUpload = { buffer: buffer, label: file.name };
    return searchImageBytes(buffer, file.name);
  });
}

// Runs whatever search the address holds.
function searchFromAddress() {
  lastUpload = null;
  const search = readAddress();
  const radio = el.models.querySelector("input[value='" + search.model + "']");
  if (radio) radio.checked = true;
  if (search.image) return searchImage(search.image);
  el.q.value = search.q || "";
  if (search.q !== null) return searchText(search.q);
  showQueryImage(null);
  clearResults();
  showMessage("Search by text in any language, or by an image.", false);
  setState("idle");
  return Promise.resolve();
}

// index.html lists the usual models with readable labels; keep only the ones this server serves and add any
// it serves that the markup does not know, so every choice names a model the server has.
// One radio button per retrieval model the server serves, before "Compare both".
function buildModelChoices() {
  const both = el.models.querySelector("input[value='" + CSS.escape(BOTH) + "']").closest("label");
  for (const model of settings.retrieval_models) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "radio";
    input.name = "model";
    input.value = model;
    input.checked = model === settings.default_model;
    label.append(input, " " + (settings.model_labels[model] || model));
    el.models.insertBefore(label, both);
  }
}

function listen() {
  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    writeAddress({ q: el.q.value.trim(), model: selectedModel() }, false);
    searchText(el.q.value);
  });

  el.upload.addEventListener("change", () => {
    searchUpload(el.upload.files[0]);
    el.upload.value = "";
  });

  el.models.addEventListener("change", () => {
    const search = readAddress();
    search.model = selectedModel();
    if (search.q === null && !search.image) {
      writeAddress(search, true);
      if (lastUpload) searchImageBytes(lastUpload.buffer, lastUpload.label);  // compare the upload too
      return;
    }
    writeAddress(search, false);
    searchFromAddress();
  });

  window.addEventListener("popstate", searchFromAddress);
}

// The page settings first: the address cannot be read, nor a search sent, without the model names.
async function start() {
  try {
    settings = await fetchJson(PAGE_SETTINGS_URL);
  } catch (err) {
    showMessage("The search page cannot start: " + err.message, true);
    setState("error");
    return;
  }
  buildModelChoices();
  listen();
  await searchFromAddress();
}

start();
