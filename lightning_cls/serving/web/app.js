// The pages of lightning_cls serve: Tag (/), Review (/review), Model (/model). A client of the service's own API.
// Every text reaches the page through textContent (el() below appends strings as text nodes), never innerHTML: an
// abstract holding <script> or HTML is shown as written. The API key lives in this tab's sessionStorage and travels
// only in the Authorization header, never in a URL.
"use strict";

const KEY = "lightning_cls_api_key";
const REVIEWER = "lightning_cls_reviewer";
const $ = (id) => document.getElementById(id);
let info = null; // GET /pages/info: labels, problem type, thresholds, the lexical expert, keep_texts
let infoLoad = null; // its request: what every use waits for, so that nothing reads `info` before it has come

// GET /pages/info, once; asked again after a failure. A Tag clicked before it has come waits for it: it decides the
// evidence asked for (the expert's words only where the model has an expert).
function loadInfo() {
  if (!infoLoad) {
    infoLoad = api("GET", "/pages/info").then((data) => (info = data), (err) => { infoLoad = null; throw err; });
  }
  return infoLoad;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

async function api(method, path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail !== undefined ? data.detail : response.status + " " + response.statusText;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return data;
}

function pct(p) { return (100 * p).toFixed(1) + "%"; }

// ------------------------------------------------------------------------------------------------ evidence
function evidenceOf(evidence) {
  const box = el("div", { class: "evidence" });
  if (!evidence) return box;
  for (const kind of ["lexical", "network"]) {
    const phrases = evidence[kind];
    if (!phrases) continue;
    const line = el("div", {}, el("span", { class: "kind" }, kind === "lexical" ? "words:" : "network:"));
    if (!phrases.length) line.append(el("span", { class: "kind" }, "nothing pushed it up"));
    for (const p of phrases) {
      line.append(el("span", { class: "phrase " + kind, title: "+" + p.weight.toFixed(3) }, p.text));
    }
    box.append(line);
  }
  return box;
}

// The text, with the spans the network's evidence for `label` found marked (offsets into the text).
function markedText(text, evidence) {
  const p = el("p", { class: "text" });
  const spans = (evidence && evidence.network ? evidence.network : []).slice().sort((a, b) => a.start - b.start);
  let at = 0;
  for (const s of spans) {
    if (s.start < at) continue;
    p.append(text.slice(at, s.start), el("mark", { title: "+" + s.weight.toFixed(3) }, text.slice(s.start, s.end)));
    at = s.end;
  }
  p.append(text.slice(at));
  return p;
}

function subjectsOf(answer) {
  const list = el("div", { class: "subjects" });
  const set = answer.labels || null;
  for (const t of answer.top_k) {
    const inSet = set ? set.includes(t.label) : t.label === answer.label;
    const threshold = info && info.thresholds ? info.thresholds[t.label] : null;
    const row = el("div", { class: "subject" + (inSet ? " in-set" : "") },
      el("span", { class: "name" }, (set && inSet ? "\u2713 " : "") + t.label),
      el("meter", { min: "0", max: "1", value: String(t.probability) }),
      el("span", {}, pct(t.probability) + (threshold !== null && threshold !== undefined ? " / " + threshold.toFixed(2) : "")),
      evidenceOf(answer.evidence ? answer.evidence[t.label] : null));
    list.append(row);
  }
  return list;
}

function answerCard(text, answer) {
  const meta = el("div", { class: "meta" },
    el("span", { class: "badge" }, "version " + answer.model_version),
    answer.abstained ? el("span", { class: "badge warn" }, "abstained") : null,
    answer.truncated ? el("span", { class: "badge warn" }, "text cut: " + answer.windows + " window(s) read") : null,
    el("span", { class: "badge" }, answer.num_tokens + " tokens"));
  const top = answer.evidence ? answer.evidence[answer.label] : null;
  return el("div", { class: "card answer" }, meta, markedText(text, top), subjectsOf(answer));
}

// ------------------------------------------------------------------------------------------------ Tag
function splitTexts(value) {
  return value.split(/\n[ \t]*\n/).map((t) => t.trim()).filter((t) => t.length > 0);
}

async function tag() {
  $("tag-error").textContent = "";
  const texts = splitTexts($("texts").value);
  $("tag-button").disabled = true;
  try {
    await loadInfo();
    const explain = [];
    if (info.lexical) explain.push("lexical");
    if ($("network").checked || !info.lexical) explain.push("network");
    const data = await api("POST", "/predict", { texts, explain });
    const box = $("answers");
    box.replaceChildren();
    data.predictions.forEach((answer, i) => box.append(answerCard(texts[i], answer)));
  } catch (err) {
    $("tag-error").textContent = err.message;
  } finally {
    $("tag-button").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------------ Review
let current = null; // the item shown: {item, chosen: Set} for a label set

function reviewer() {
  let id = sessionStorage.getItem(REVIEWER);
  if (!id) {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    id = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem(REVIEWER, id);
  }
  return id;
}

async function nextItem() {
  $("review-error").textContent = "";
  const box = $("review-item");
  try {
    await loadInfo();
    const data = await api("GET", "/pages/review/next?reviewer=" + encodeURIComponent(reviewer()));
    current = data.item ? { item: data.item, chosen: new Set(data.item.labels || []) } : null;
    box.replaceChildren();
    if (!current) {
      $("review-status").textContent = "The queue is empty.";
      return;
    }
    $("review-status").textContent = data.item.remaining + " item(s) in the queue.";
    box.append(reviewCard(data.item));
  } catch (err) {
    $("review-error").textContent = err.message;
  }
}

function labelOrder(item) {
  const first = item.top_k.map((t) => t.label);
  return first.concat(info.labels.filter((n) => !first.includes(n)));
}

function reviewCard(item) {
  const meta = el("div", { class: "meta" },
    el("span", { class: "badge" }, "version " + item.model_version),
    ...item.reasons.map((r) => el("span", { class: "badge warn" }, r)));
  const buttons = el("div", { class: "labels" });
  labelOrder(item).forEach((name, i) => {
    const key = i < 10 ? String((i + 1) % 10) + " " : "";
    if (info.problem_type === "multi_label") {
      const box = el("input", { type: "checkbox", "data-label": name });
      box.checked = current.chosen.has(name);
      box.addEventListener("change", () => (box.checked ? current.chosen.add(name) : current.chosen.delete(name)));
      buttons.append(el("label", {}, box, " " + key + name));
    } else {
      const b = el("button", { type: "button", class: i < item.top_k.length ? "suggested" : "", "data-label": name },
        key + name);
      b.addEventListener("click", () => answerWith(name));
      buttons.append(b);
    }
  });
  if (info.problem_type === "multi_label") {
    const send = el("button", { type: "button", id: "send-set" }, "Send the set (Enter)");
    send.addEventListener("click", () => answerWith(null));
    buttons.append(send);
  }
  const skipButton = el("button", { type: "button", id: "skip" }, "Skip (s)");
  skipButton.addEventListener("click", skip);
  buttons.append(skipButton);
  return el("div", { class: "card review" }, meta, el("p", { class: "text" }, item.text), subjectsOf(item), buttons);
}

async function answerWith(name) {
  if (!current) return;
  const item = current.item;
  const entry = { prediction_id: item.prediction_id };
  if (info.problem_type === "multi_label") entry.labels = name ? [name] : Array.from(current.chosen);
  else entry.label = name;
  try {
    await api("POST", "/feedback", { feedback: [entry] });
    await nextItem();
  } catch (err) {
    $("review-error").textContent = err.message;
  }
}

async function skip() {
  if (!current) return;
  try {
    await api("POST", "/pages/review/skip", { prediction_id: current.item.prediction_id, reviewer: reviewer() });
    await nextItem();
  } catch (err) {
    $("review-error").textContent = err.message;
  }
}

function reviewKeys(event) {
  if ($("review").hidden || !current || event.target.tagName === "INPUT" && event.target.type !== "checkbox") return;
  const order = labelOrder(current.item);
  if (event.key === "s") skip();
  else if (event.key === "Enter" && info.problem_type === "multi_label") answerWith(null);
  else if (/^[0-9]$/.test(event.key)) {
    const name = order[(Number(event.key) + 9) % 10];
    if (!name) return;
    if (info.problem_type === "multi_label") {
      const box = document.querySelector('input[data-label="' + CSS.escape(name) + '"]');
      box.checked = !box.checked;
      box.dispatchEvent(new Event("change"));
    } else answerWith(name);
  }
}

// ------------------------------------------------------------------------------------------------ Model
function plot(title, seriesByVersion, field, yMax) {
  const w = 420, h = 170, left = 40, bottom = 22, top = 18;
  const box = svg("svg", { class: "plot", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img" });
  const label = svg("text", { x: 6, y: 13 });
  label.textContent = title;
  box.append(label);
  const points = Object.values(seriesByVersion).flat().filter((p) => p[field] !== null && p[field] !== undefined);
  if (!points.length) {
    const none = svg("text", { x: left, y: h / 2 });
    none.textContent = "no data yet";
    box.append(none);
    return box;
  }
  const times = points.map((p) => p.time);
  const t0 = Math.min(...times), t1 = Math.max(...times) || t0 + 1;
  const max = yMax || Math.max(...points.map((p) => p[field]), 1e-9);
  const x = (t) => left + (t1 === t0 ? (w - left) / 2 : ((t - t0) / (t1 - t0)) * (w - left - 10));
  const y = (v) => h - bottom - (v / max) * (h - bottom - top);
  box.append(svg("line", { x1: left, y1: h - bottom, x2: w - 5, y2: h - bottom, stroke: "#999" }));
  for (const v of [0, max]) {
    const tick = svg("text", { x: 2, y: y(v) + 4 });
    tick.textContent = v.toFixed(2);
    box.append(tick);
  }
  const colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
  Object.entries(seriesByVersion).forEach(([version, pts], i) => {
    const usable = pts.filter((p) => p[field] !== null && p[field] !== undefined);
    const colour = colours[i % colours.length];
    if (usable.length > 1) {
      box.append(svg("polyline", {
        points: usable.map((p) => `${x(p.time)},${y(p[field])}`).join(" "), fill: "none", stroke: colour,
        "stroke-width": 2,
      }));
    }
    for (const p of usable) box.append(svg("circle", { cx: x(p.time), cy: y(p[field]), r: 2.5, fill: colour }));
    const name = svg("text", { x: left + 4 + i * 110, y: h - 5, fill: colour });
    name.textContent = version;
    box.append(name);
  });
  return box;
}

async function loadModel() {
  $("model-error").textContent = "";
  try {
    await loadInfo();
    const data = await api("GET", "/pages/history");
    const last = data.deployments.length ? data.deployments[data.deployments.length - 1].state : null;
    const roles = $("model-roles");
    roles.replaceChildren();
    if (last) {
      roles.append(el("p", {}, "Champion: ", el("strong", {}, last.champion.version), " (" + last.champion.source + ")"));
      if (last.challenger) {
        roles.append(el("p", {}, "Challenger: ", el("strong", {}, last.challenger.version),
          ` (${last.mode}, ${pct(last.share)} of the requests)`));
      }
    }
    roles.append(el("p", { class: "hint" }, "Validation accuracy " +
      (info.validation_accuracy === null ? "not recorded" : info.validation_accuracy.toFixed(3)) +
      "; one point per " + (data.bucket_seconds ? data.bucket_seconds + " s" : "bucket") + "."));
    const plots = $("model-plots");
    plots.replaceChildren(
      plot("Estimated accuracy (mean probability)", data.versions, "estimated_accuracy", 1),
      plot("Live accuracy (true labels received)", data.versions, "live_accuracy", 1),
      plot("Label PSI against the training split", data.versions, "label_psi"),
      plot("Low-confidence share", data.versions, "low_confidence_share", 1),
      plot("Feedback received (running total)", data.versions, "feedback_total"),
      plot("Answers per bucket", data.versions, "answers"));
    const alerts = $("model-alerts");
    alerts.replaceChildren(...(data.alerts.length ? data.alerts.map((a) =>
      el("li", {}, new Date(a.time * 1000).toISOString() + " " + a.version + ": " + a.alert)) : [el("li", {}, "none")]));
    $("model-deployments").replaceChildren(...data.deployments.slice().reverse().map((d) =>
      el("li", {}, new Date(d.time * 1000).toISOString() + " " + d.action + ": champion " + d.state.champion.version +
        (d.state.challenger ? ", challenger " + d.state.challenger.version + " (" + d.state.mode + ")" : "") +
        (d.reason ? " (" + d.reason + ")" : ""))));
  } catch (err) {
    $("model-error").textContent = err.message;
  }
}

// ------------------------------------------------------------------------------------------------ start
async function start() {
  const view = { "/": "tag", "/review": "review", "/model": "model" }[location.pathname] || "tag";
  $(view).hidden = false;
  $("nav-" + view).className = "current";
  $("key-state").textContent = sessionStorage.getItem(KEY) ? "key set for this tab" : "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value;
    if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
    $("api-key").value = "";
    $("key-state").textContent = key ? "key set for this tab" : "no key";
    if (view === "review") nextItem();
    if (view === "model") loadModel();
  });
  $("tag-button").addEventListener("click", tag);
  document.addEventListener("keydown", reviewKeys);
  try {
    await loadInfo();
  } catch (err) {
    $(view + "-error").textContent = err.message;
    return;
  }
  if (view === "review") nextItem();
  if (view === "model") loadModel();
}

document.addEventListener("DOMContentLoaded", start);
