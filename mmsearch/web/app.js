// mmsearch web page: plain DOM, no build step. Catalog text is always set with textContent (never HTML).
"use strict";

const OPERATORS = ["=", "!=", "<", ">", "<=", ">=", "~"];
const THUMB_SIZE = 256; // px, longest side; cards are ~200 CSS px wide, so this stays sharp on 1.25x screens
const $ = (id) => document.getElementById(id);

const state = { file: null, previewUrl: null, similarTo: null, maxUploadBytes: 10 * 1024 * 1024 };

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.similarTo = null;
    search();
  });
  $("image-input").addEventListener("change", (event) => setFile(event.target.files[0] || null));
  $("clear-image").addEventListener("click", () => setFile(null));
  $("q").addEventListener("input", updateMix);
  $("similar-clear").addEventListener("click", () => {
    state.similarTo = null;
    search();
  });
  setUpDrop($("drop"));
  loadInfo();
});

async function loadInfo() {
  try {
    const info = await fetchJson("/api/info");
    $("index-label").textContent = `${info.items} items · ${info.model}`;
    if (info.limits) state.maxUploadBytes = info.limits.max_upload_bytes;
    buildFilters(info.fields || []);
  } catch (err) {
    showStatus(`Cannot read the index: ${err.message}`, true);
  }
}

function buildFilters(fields) {
  const box = $("filters");
  box.replaceChildren();
  for (const name of fields) {
    const label = document.createElement("label");
    label.className = "filter";
    const title = document.createElement("span");
    title.textContent = name;
    const op = document.createElement("select");
    op.dataset.field = name;
    op.setAttribute("aria-label", `${name} comparison`);
    for (const symbol of OPERATORS) op.append(new Option(symbol === "~" ? "contains" : symbol, symbol));
    const value = document.createElement("input");
    value.type = "text";
    value.dataset.field = name;
    value.placeholder = "any";
    value.setAttribute("aria-label", `${name} value`);
    label.append(title, op, value);
    box.append(label);
  }
  box.dataset.ready = "true";
}

function filters() {
  const out = [];
  for (const input of $("filters").querySelectorAll("input[data-field]")) {
    const value = input.value.trim();
    if (!value) continue;
    const op = input.previousElementSibling.value;
    out.push(`${input.dataset.field}${op}${value}`);
  }
  return out;
}

function setUpDrop(zone) {
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) zone.addEventListener(name, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) setFile(file);
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("image-input").click();
    }
  });
}

function setFile(file) {
  if (file && file.size > state.maxUploadBytes) {
    showStatus(`That image is over ${Math.round(state.maxUploadBytes / 2 ** 20)} MB.`, true);
    file = null;
  }
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.file = file;
  state.previewUrl = file ? URL.createObjectURL(file) : null;
  $("preview").hidden = !file;
  $("preview").src = state.previewUrl || "";
  $("drop-text").hidden = Boolean(file);
  $("clear-image").hidden = !file;
  if (!file) $("image-input").value = "";
  updateMix();
}

// The image/words slider only matters when the query has both.
function updateMix() {
  $("mix").hidden = !(state.file && $("q").value.trim());
}

function commonParams() {
  const params = new URLSearchParams({ k: $("k").value || "24", explain: "1" });
  if ($("target").value) params.set("target", $("target").value);
  for (const condition of filters()) params.append("where", condition);
  return params;
}

async function search() {
  const words = $("q").value.trim();
  if (!state.similarTo && !words && !state.file) {
    showStatus("Type some words or add an image.", true);
    return;
  }
  const params = commonParams();
  let request;
  if (state.similarTo) {
    request = fetchJson(`/api/similar/${encodeURIComponent(state.similarTo.id)}?${params}`);
  } else if (state.file) {
    request = fetchJson("/api/search", { method: "POST", body: uploadForm(params, words) });
  } else {
    params.set("q", words);
    request = fetchJson(`/api/search?${params}`);
  }
  await run(request);
}

function uploadForm(params, words) {
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image");
  const imageShare = Number($("mix-range").value);
  if (words) {
    form.append("text", words);
    form.append("image_weight", String(imageShare));
    form.append("text_weight", String(Math.round((1 - imageShare) * 10) / 10));
  }
  for (const [key, value] of params) form.append(key, value);
  return form;
}

async function run(request) {
  const results = $("results");
  results.dataset.state = "loading";
  $("search-btn").disabled = true;
  showStatus("Searching…");
  const started = performance.now();
  try {
    const data = await request;
    render(data, performance.now() - started);
    results.dataset.state = "done";
  } catch (err) {
    showStatus(err.message, true);
    results.dataset.state = "error";
  } finally {
    $("search-btn").disabled = false;
    results.dataset.searches = String(Number(results.dataset.searches) + 1);
  }
}

async function fetchJson(url, options) {
  const response = await fetch(url, options);
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
  return data;
}

function render(data, ms) {
  const hits = data.results || [];
  $("no-match").hidden = !(data.match && data.match.no_good_match && hits.length);
  $("similar-banner").hidden = !state.similarTo;
  if (state.similarTo) $("similar-label").textContent = state.similarTo.caption || state.similarTo.id;
  showStatus(hits.length ? `${hits.length} results in ${Math.round(ms)} ms` : "No results (check the filters).");
  $("legend").hidden = !hits.some((hit) => hit.explain);
  $("results").replaceChildren(...hits.map(card));
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function card(hit) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = hit.id;
  node.querySelector(".caption").textContent = hit.caption || hit.id;
  node.querySelector(".score").textContent = `score ${hit.score.toFixed(3)}`;
  node.querySelector(".id").textContent = hit.id;
  fillThumb(node, hit);
  fillMeta(node.querySelector(".meta"), hit.metadata || {});
  if (hit.explain) fillExplain(node, hit.explain);
  return node;
}

function fillThumb(node, hit) {
  const button = node.querySelector(".thumb");
  const img = button.querySelector("img");
  if (hit.image) {
    img.src = `/images/${encodeURIComponent(hit.id)}?size=${THUMB_SIZE}`;
    img.alt = hit.caption || hit.id;
    img.addEventListener("error", () => button.classList.add("missing"), { once: true });
  } else {
    button.classList.add("missing");
    img.remove();
  }
  button.addEventListener("click", () => {
    state.similarTo = { id: hit.id, caption: hit.caption };
    search();
  });
}

function fillMeta(list, metadata) {
  for (const [key, value] of Object.entries(metadata)) {
    if (value === null || value === "") continue;
    const term = document.createElement("dt");
    term.textContent = key;
    const detail = document.createElement("dd");
    detail.textContent = String(value);
    list.append(term, detail);
  }
}

// How much of the score came from the item's image vs its caption: attention weighted by each part's share.
function modalityShares(explain) {
  let image = 0;
  let caption = 0;
  for (const part of explain.parts) {
    const share = Math.abs(part.weight_in_score || 0);
    image += share * (part.modality_attention.image || 0);
    caption += share * (part.modality_attention.caption || 0);
  }
  const total = image + caption;
  return total > 0 ? { image: image / total, caption: caption / total } : null;
}

function fillExplain(node, explain) {
  const shares = modalityShares(explain);
  if (shares) {
    const bar = node.querySelector(".mixbar");
    bar.hidden = false;
    bar.title = `${pct(shares.image)} from the image, ${pct(shares.caption)} from the caption`;
    bar.querySelector(".img-share").style.flexGrow = String(shares.image);
    bar.querySelector(".cap-share").style.flexGrow = String(shares.caption);
  }
  const list = node.querySelector(".parts");
  for (const part of explain.parts) {
    const item = document.createElement("li");
    const att = part.modality_attention;
    const sign = part.contribution >= 0 ? "+" : "";
    item.textContent = `${sign}${part.contribution.toFixed(3)} from ${partLabel(part.part)}: ` +
      `image ${pct(att.image)}, caption ${pct(att.caption)}`;
    list.append(item);
  }
  node.querySelector(".why").hidden = false;
}

// "text:red (w=0.5)" -> '"red" (w=0.5)'; "image:upload:x.png" -> "your image"; "image:item:ID" -> "item ID".
function partLabel(label) {
  const match = /^(text|image):(.*?)( \(w=[^)]*\))?$/.exec(label);
  if (!match) return label;
  const [, kind, value, weight = ""] = match;
  if (kind === "text") return `"${value}"${weight}`;
  if (value.startsWith("upload:")) return `your image${weight}`;
  return `${value.replace(/^item:/, "item ")}${weight}`;
}

function pct(value) {
  return value === null || value === undefined ? "–" : `${Math.round(100 * value)}%`;
}

function showStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}
