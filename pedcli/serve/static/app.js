// ped serve: the search page. Every string from the server (queries, file names, phrases) is put into the
// page as text (textContent / attributes set through the DOM), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.fix = body.fix || "";
    throw error;
  }
  return body;
}

// ---- header and first-sync progress ------------------------------------------------------------------
let ready = false;

function showInfo(info) {
  const parts = [
    `${info.gallery_size === null ? "…" : info.gallery_size} images in ${info.gallery}`,
    `method ${info.method}`,
    `run ${info.run}`,
  ];
  const metrics = Object.entries(info.metrics || {}).map(([k, v]) => `${k} ${Number(v).toFixed(1)}`);
  if (metrics.length) parts.push(`validation ${metrics.join(" · ")}`);
  if (info.skipped) parts.push(`${info.skipped} unreadable file(s) skipped`);
  $("meta").textContent = parts.join(" · ");
  const sync = info.sync;
  $("sync").hidden = sync.synced && !sync.running;
  if (sync.error) {
    $("sync-label").textContent = `indexing failed: ${sync.error}`;
  } else if (sync.running) {
    $("sync-label").textContent = `indexing the gallery: ${sync.done} of ${sync.total || "?"} images`;
    $("sync-bar").max = Math.max(sync.total, 1);
    $("sync-bar").value = sync.done;
  }
  ready = sync.synced;
}

async function pollInfo() {
  try {
    const info = await getJSON("/api/info");
    showInfo(info);
    if (!info.sync.synced && !info.sync.error) setTimeout(pollInfo, 400);
  } catch (error) {
    $("meta").textContent = `cannot reach the server: ${error.message}`;
    setTimeout(pollInfo, 2000);
  }
}

// ---- results -----------------------------------------------------------------------------------------
function overlay(view) {
  // the method's attention drawn over the image: one tinted cell per grid cell, kept cells outlined
  const layer = el("div", "overlay");
  if (!view || !view.grid) return layer;
  const rows = view.grid.length;
  const cols = view.grid[0].length;
  view.grid.forEach((row, r) => {
    row.forEach((value, c) => {
      const cell = el("div", "cell");
      if (view.selected && view.selected[r][c]) cell.classList.add("sel");
      cell.style.top = `${(100 * r) / rows}%`;
      cell.style.left = `${(100 * c) / cols}%`;
      cell.style.height = `${100 / rows}%`;
      cell.style.width = `${100 / cols}%`;
      cell.style.background = `rgba(255, 40, 0, ${(0.6 * value * value).toFixed(3)})`;
      layer.append(cell);
    });
  });
  return layer;
}

function figure(result, large) {
  const box = el("div", large ? "thumb large" : "thumb");
  const img = el("img");
  img.src = `/image/${encodeURIComponent(result.id)}`;
  img.alt = result.name;
  box.append(img, overlay(result.view));
  return box;
}

function showDetail(result) {
  const detail = $("detail");
  detail.replaceChildren();
  detail.hidden = false;
  detail.append(el("h2", "", `#${result.rank} · ${result.score.toFixed(4)}`));
  detail.append(el("div", "name", result.name));
  const pair = el("div", "pair");
  const plain = el("div", "thumb large");
  const img = el("img");
  img.src = `/image/${encodeURIComponent(result.id)}`;
  img.alt = result.name;
  plain.append(img);
  pair.append(plain);
  const view = result.view || {};
  if (view.grid) pair.append(figure(result, true));
  detail.append(pair);
  detail.append(el("div", "label", view.label || "this method draws no attention for its matches"));
  if (view.phrases && view.phrases.length) {
    const list = el("ul", "links");
    for (const link of view.phrases) {
      const item = el("li");
      item.append(el("b", "", link.phrase), document.createTextNode(" → "), el("span", "", link.part));
      item.append(el("span", "weight", ` ${link.weight.toFixed(2)}`));
      list.append(item);
    }
    detail.append(list);
  }
  const more = el("button", "more", "more like this");
  more.type = "button";
  more.addEventListener("click", () => similar(result));
  detail.append(more);
}

function emptyState(data, minScore) {
  const box = el("div", "empty");
  if (!data.gallery_size) {
    box.append(el("p", "", "The gallery has no readable images yet."));
    box.append(el("p", "", "Add image files (jpg, png, webp, bmp) to the gallery folder; the next search finds them."));
  } else if (minScore !== null) {
    box.append(el("p", "", `Nothing scores at least ${minScore}.`));
    box.append(el("p", "", "Lower or clear min score, or describe what stands out: clothing colours, bags, shoes."));
  } else {
    box.append(el("p", "", "No match."));
  }
  return box;
}

function showResults(data, minScore) {
  const query = data.queries[0];
  const results = $("results");
  results.replaceChildren();
  $("detail").hidden = true;
  const notes = [];
  if (query.phrases.length) notes.push(`noun phrases: ${query.phrases.join(" · ")}`);
  if (query.unknown_words && query.unknown_words.length) {
    notes.push(`words the model does not know (read as unknown): ${query.unknown_words.join(", ")}`);
  }
  $("phrases").textContent = notes.join(" — ");
  if (!query.results.length) {
    results.append(emptyState(data, minScore));
    return;
  }
  for (const result of query.results) {
    const card = el("figure", "card");
    card.tabIndex = 0;
    card.append(figure(result, false));
    const caption = el("figcaption");
    caption.append(el("span", "rank", `#${result.rank}`), el("span", "score", result.score.toFixed(3)));
    caption.append(el("div", "name", result.name));
    card.append(caption);
    card.addEventListener("click", () => {
      for (const other of results.querySelectorAll(".card.active")) other.classList.remove("active");
      card.classList.add("active");
      showDetail(result);
    });
    results.append(card);
  }
}

function setStatus(text, fix) {
  $("status").textContent = fix ? `${text} — ${fix}` : text;
}

async function run(url, label, minScore) {
  if (!ready) {
    setStatus("the gallery is still being indexed", "wait for the progress bar to finish");
    return;
  }
  setStatus(`${label}…`);
  const started = performance.now();
  try {
    const data = await getJSON(url);
    showResults(data, minScore);
    const n = data.queries[0].results.length;
    setStatus(`${label}: ${n} result(s) of ${data.gallery_size} images in ${Math.round(performance.now() - started)} ms`);
    getJSON("/api/info").then(showInfo, () => {});
  } catch (error) {
    setStatus(`error: ${error.message}`, error.fix);
  }
}

function search(event) {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  const params = new URLSearchParams({ q, top: $("top").value || "12" });
  const raw = $("min-score").value.trim();
  const minScore = raw === "" ? null : Number(raw);
  if (minScore !== null) params.set("min_score", raw);
  history.replaceState(null, "", `?${params}`);
  run(`/api/search?${params}`, `“${q}”`, minScore);
}

function similar(result) {
  $("phrases").textContent = "";
  const params = new URLSearchParams({ top: $("top").value || "12" });
  run(`/api/similar/${encodeURIComponent(result.id)}?${params}`, `more like ${result.name}`, null);
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", search);
  const given = new URLSearchParams(location.search);
  if (given.get("q")) $("q").value = given.get("q");
  if (given.get("top")) $("top").value = given.get("top");
  if (given.get("min_score")) $("min-score").value = given.get("min_score");
  if (given.has("token")) history.replaceState(null, "", location.pathname);  // the cookie carries it now
  pollInfo();
});
