// The operator page: polls /api/state a few times a second, the review queue more slowly.
// Everything from the server goes in as text (textContent), never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
let live_seq = null, rejects_key = "", queue = [], sel = 0, labels = ["good", "defect"];
let period = 250;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : String(k));
  return e;
}
const fmt = (x, d = 3) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);
const when = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "";

async function post(url, body) {
  const r = await fetch(url, {method: "POST", body: JSON.stringify(body || {}),
    headers: {"Content-Type": "application/json", "X-Edge-Inspect": "1"}});
  return [r.status, await r.json().catch(() => ({}))];
}

function health(h) {
  const rows = [["source", h.source + (h.source_reason ? ` (${h.source_reason})` : "")],
    ["gate", h.gate], ["mqtt", h.mqtt], ["trigger", h.trigger], ["model", h.model],
    ["model sha", (h.model_sha256 || "").slice(0, 16)],
    ["threshold", `${fmt(h.threshold)} (${h.threshold_source || ""})`],
    ["engine", h.engine], ["kicks failed", h.kicks_failed],
    ["defect map", h.defect_map ? "yes" : "none from this model"]];
  const bad = new Set(["degraded", "down", "refused"]);
  $("health").replaceChildren(...rows.flatMap(([k, v]) =>
    [el("dt", {}, k), el("dd", {class: bad.has(v) ? "bad" : ""}, v ?? "")]));
}

function bars(hourly) {
  const max = Math.max(1, ...hourly.map((b) => b.pass + b.reject + b.failsafe));
  $("hourly").replaceChildren(...hourly.map((b) => {
    const n = b.pass + b.reject + b.failsafe;
    const bar = el("div", {class: "bar", title:
      `${new Date(b.hour * 1000).getHours()}:00  ${b.pass} pass, ${b.reject} reject, ${b.failsafe} failsafe`});
    for (const [k, c] of [["pass", "p"], ["reject", "r"], ["failsafe", "f"]]) {
      const i = el("i", {class: c});
      i.style.height = (80 * b[k] / max) + "px";
      bar.append(i);
    }
    bar.dataset.n = n;
    return bar;
  }));
}

function gallery(rejects) {
  const key = rejects.map((r) => r.seq).join(",");
  if (key === rejects_key) return;
  rejects_key = key;
  $("rejects").replaceChildren(...rejects.map((r) => {
    const card = el("div", {class: "card reject-card", "data-seq": r.seq, "data-part": r.part});
    if (r.has_image) card.append(el("img", {src: `/api/reject/${r.seq}.jpg`, alt: r.part,
                                            loading: "lazy"}));
    card.append(el("div", {}, el("span", {class: "badge " + r.verdict}, r.verdict), " ",
                   r.label || r.reason, " ", fmt(r.score)),
                el("div", {class: "muted"}, `${when(r.t)}  ${r.part}`));
    if (!r.has_map) card.append(el("div", {class: "note map-none"},
                                   "no defect map: this model gives class scores only"));
    return card;
  }));
}

async function tick() {
  try {
    const r = await fetch("/api/state");
    if (!r.ok) throw new Error(r.status);
    const s = await r.json();
    period = 1000 / Math.max(0.5, s.live_fps);
    const h = s.health, c = s.counters;
    $("station").textContent = h.station;
    $("state").textContent = h.state + (h.paused ? " (paused)" : "");
    $("state").className = "badge " + h.state;
    $("model").textContent = `${h.model || ""} ${(h.model_sha256 || "").slice(0, 12)}  v${s.version}`;
    $("control").hidden = !s.control;
    health(h);
    for (const k of ["parts", "pass", "reject", "failsafe"]) $("c-" + k).textContent = c[k];
    $("c-rate").textContent = fmt(c.rate_per_min, 0);
    $("c-p50").textContent = fmt(c.latency_p50_ms, 1);
    $("c-p99").textContent = fmt(c.latency_p99_ms, 1);
    $("failsafe-reasons").replaceChildren(...Object.entries(c.failsafe_reasons)
      .map(([k, v]) => el("li", {}, `${k}: ${v}`)));
    bars(c.hourly);
    $("map-note").textContent = h.defect_map ? "" :
      "(no defect map: this model outputs class scores only, images shown without overlay)";
    const l = s.latest;
    if (l && l.seq !== live_seq) {
      live_seq = l.seq;
      if (l.has_image) $("live").src = `/api/live.jpg?s=${l.seq}`;
      $("live-verdict").textContent = `${l.verdict} ${fmt(l.score)}`;
      $("live-verdict").className = "badge " + l.verdict;
      $("live-meta").textContent = `${l.part}  ${when(l.t)}  ${l.label || l.reason}  ` +
        `${fmt(l.latency_ms, 1)} ms`;
    }
    gallery(s.rejects);
    if (!s.review) $("review-box").hidden = true;
  } catch (e) {
    $("state").textContent = "no connection";
    $("state").className = "badge";
  }
  setTimeout(tick, period);
}

function showReview() {
  const box = $("review-current");
  const it = queue[sel];
  $("review-list").replaceChildren(...queue.map((q, i) => {
    const li = el("li", {class: (i === sel ? "sel " : "") + (q.review ? "done" : "")},
      `${q.verdict} ${q.part} ${fmt(q.score)}` + (q.review ? ` → ${q.review.label} (${q.review.by})` : ""));
    li.onclick = () => { sel = i; showReview(); };
    return li;
  }));
  if (!it) { box.replaceChildren(el("p", {class: "muted"}, "Nothing recorded yet.")); return; }
  const buttons = labels.map((lab, i) => {
    const key = lab === "good" ? "g" : (i === 1 ? "d / 1" : String(i));
    const b = el("button", {type: "button", id: "btn-" + lab, "data-label": lab}, `${lab} (${key})`);
    b.onclick = () => mark(lab);
    return b;
  });
  const status = it.review ? `marked ${it.review.label} by ${it.review.by} at ${when(it.review.at)}`
                           : "not reviewed";
  box.replaceChildren(
    el("img", {src: "/recorded/" + it.path.split("/").map(encodeURIComponent).join("/"), alt: it.part}),
    el("div", {}, el("div", {}, el("span", {class: "badge " + it.verdict}, it.verdict), " ",
                     it.label || it.reason, " ", fmt(it.score)),
       el("div", {class: "muted"}, `${it.part}  ${when(it.t)}`),
       el("div", {id: "review-status", "data-path": it.path,
                  "data-label": it.review ? it.review.label : ""}, status),
       el("div", {}, ...buttons)));
}

async function loadQueue() {
  try {
    const r = await fetch("/api/review");
    if (r.ok) {
      const q = await r.json();
      const cur = queue[sel] && queue[sel].path;
      labels = q.labels;
      queue = q.items;
      const i = queue.findIndex((x) => x.path === cur);
      sel = i >= 0 ? i : 0;
      $("review-count").textContent = `${q.pending} to review, ${q.reviewed} reviewed`;
      showReview();
    }
  } catch (e) { /* the state poll shows the lost connection */ }
}

async function mark(label) {
  const it = queue[sel];
  if (!it) return;
  const [code, out] = await post("/api/review", {path: it.path, label, by: $("who").value});
  if (code === 200) {
    it.review = out.review;
    const next = queue.findIndex((q, i) => i > sel && !q.review);
    if (next >= 0) sel = next;
    showReview();
    loadQueue();      // the counts, and anything recorded meanwhile
  } else {
    alert(out.error || code);
  }
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "g") mark("good");
  else if (e.key === "d" && labels.length > 1) mark(labels[1]);
  else if (/^[1-9]$/.test(e.key) && labels[Number(e.key)]) mark(labels[Number(e.key)]);
  else if (e.key === "j" || e.key === "ArrowRight") { sel = Math.min(queue.length - 1, sel + 1); showReview(); }
  else if (e.key === "k" || e.key === "ArrowLeft") { sel = Math.max(0, sel - 1); showReview(); }
});

async function control(verb, body) {
  const [code, out] = await post("/api/control/" + verb, body);
  $("control-msg").textContent = code === 200 ? `${verb}: ok` : `${verb}: ${out.error || code}`;
}
$("btn-pause").onclick = () => control("pause");
$("btn-resume").onclick = () => control("resume");
$("btn-thr").onclick = () => control("threshold", {value: Number($("thr").value)});
$("who").value = localStorage.getItem("who") || "";
$("who").onchange = () => localStorage.setItem("who", $("who").value);

tick();
loadQueue();
setInterval(loadQueue, 3000);
