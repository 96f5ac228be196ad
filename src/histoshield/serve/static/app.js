// histoshield page: vanilla JS over the JSON API (no build step, no framework).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tile: null, tileName: null, attacks: {}, models: [], job: null, norm: "linf" };

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function png(b64) { return "data:image/png;base64," + b64; }

function fmtEps(v, norm) { return norm === "linf" ? `${v}/255` : `${v}`; }

async function api(path, opts) {
  const r = await fetch(path, opts);
  let body = null;
  try { body = await r.json(); } catch (e) { body = { error: `HTTP ${r.status}` }; }
  if (!r.ok) { throw new Error(body.error || `HTTP ${r.status}`); }
  return body;
}

function setStatus(id, text, isError) {
  const el = $(id);
  el.textContent = text || "";
  el.className = "status" + (isError ? " error" : "");
}

function classCell(p) {
  return `<span class="${esc(p.class)}">${esc(p.class)}</span> <span class="muted">${(100 * p.probability).toFixed(1)}%</span>`;
}

function pCell(p) {
  const w = Math.round(60 * p.p_malignant);
  return `<span class="bar" style="width:${w}px"></span>${p.p_malignant.toFixed(3)}`;
}

function renderPredictions(clean, adversarial) {
  const rows = clean.map((c, i) => {
    const a = adversarial ? adversarial[i] : null;
    const flipped = a && a.class !== c.class;
    return `<tr class="${flipped ? "flipped" : ""}" data-model="${esc(c.model)}">` +
      `<td>${esc(c.model)}</td><td class="pred-clean">${classCell(c)}</td><td class="num">${pCell(c)}</td>` +
      `<td class="pred-adv">${a ? classCell(a) + (flipped ? " ← flipped" : "") : "—"}</td>` +
      `<td class="num">${a ? pCell(a) : "—"}</td></tr>`;
  });
  $("predictions").innerHTML = rows.join("");
}

function clearAttackPanels() {
  for (const id of ["img-adversarial", "img-perturbation", "img-cam-clean", "img-cam-adv"]) {
    $(id).removeAttribute("src");
  }
  $("download").classList.add("hidden");
  $("attack-summary").textContent = "";
  $("cert-result").innerHTML = "";
}

async function useTile(blob, name) {
  state.tile = blob; state.tileName = name;
  clearAttackPanels();
  setStatus("tile-status", "predicting…");
  const fd = new FormData();
  fd.append("file", blob, name);
  try {
    const res = await api("/api/v1/predict", { method: "POST", body: fd });
    $("img-original").src = png(res.tile.png);
    renderPredictions(res.predictions, null);
    setStatus("tile-status", `${name}: ${res.tile.width}×${res.tile.height} px`);
    $("run-attack").disabled = false;
    $("run-certify").disabled = false;
  } catch (e) {
    setStatus("tile-status", e.message, true);
  }
}

function onAttackChange() {
  const a = state.attacks[$("attack").value];
  if (!a) return;
  $("attack-desc").textContent = a.description;
  const linf = a.norm === "linf";
  const eps = $("eps");
  eps.min = linf ? 0.5 : 0.05; eps.step = linf ? 0.5 : 0.05;
  eps.max = linf ? Math.round(a.max_eps * 255) : a.max_eps;
  if (a.norm !== state.norm) {  // another unit (L2, a stain budget …): start at a fifth of the cap
    eps.value = linf ? 2 : Math.round(a.max_eps / 5 / eps.step) * eps.step;
    state.norm = a.norm;
  }
  if (+eps.value > +eps.max) eps.value = eps.max;
  const hasSteps = "steps" in a.params;
  $("steps-row").classList.toggle("hidden", !hasSteps);
  if (hasSteps) $("steps").value = a.quick.steps;
  onEps();
}

function onEps() {
  const a = state.attacks[$("attack").value];
  $("eps-label").textContent = a ? `= ${fmtEps($("eps").value, a.norm)} (${a.norm || "own"} norm)` : "";
}

async function poll(jobId, bar, statusId) {
  for (;;) {
    const j = await api(`/api/v1/jobs/${jobId}`);
    bar.value = j.progress;
    if (j.status === "done") return j.result;
    if (j.status === "failed" || j.status === "cancelled") throw new Error(j.error || j.status);
    setStatus(statusId, `${j.status}… ${Math.round(100 * j.progress)}%`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function runJob(path, fd, bar, statusId, button) {
  fd.append("wait", "false");
  button.disabled = true;
  bar.classList.remove("hidden"); bar.value = 0;
  try {
    const job = await api(path, { method: "POST", body: fd });
    state.job = job.id;
    return await poll(job.id, bar, statusId);
  } finally {
    state.job = null;
    button.disabled = false;
    bar.classList.add("hidden");
  }
}

async function runAttack() {
  const a = state.attacks[$("attack").value];
  const fd = new FormData();
  fd.append("file", state.tile, state.tileName);
  fd.append("attack", a.name);
  fd.append("eps", a.norm === "linf" ? `${$("eps").value}/255` : `${$("eps").value}`);
  if ("steps" in a.params) fd.append("steps", $("steps").value);
  fd.append("seed", $("seed").value || "0");
  fd.append("model", $("target-model").value);
  clearAttackPanels();
  $("cancel").classList.remove("hidden");
  setStatus("attack-status", "queued…");
  try {
    const r = await runJob("/api/v1/attack", fd, $("attack-progress"), "attack-status", $("run-attack"));
    showAttack(r);
    setStatus("attack-status", `done in ${r.attack.seconds.toFixed(2)} s`);
  } catch (e) {
    setStatus("attack-status", e.message, true);
  } finally {
    $("cancel").classList.add("hidden");
  }
}

function showAttack(r) {
  $("img-original").src = png(r.images.original);
  $("img-adversarial").src = png(r.images.adversarial);
  $("img-perturbation").src = png(r.images.perturbation);
  const a = r.attack;
  const epsText = a.norm === "linf" ? `${a.eps_255}/255` : `${+a.eps.toFixed(4)} (${a.norm || "own"} norm)`;
  $("cap-adv").textContent = `adversarial: ${a.name}, eps ${epsText} on ${a.model}`;
  $("cap-pert").textContent = `perturbation ×${r.perturbation.amplification} (L∞ ${r.perturbation.linf_255}/255)`;
  if (r.gradcam && !r.gradcam.error) {
    $("img-cam-clean").src = png(r.gradcam.clean);
    $("img-cam-adv").src = png(r.gradcam.adversarial);
    $("cap-cam-clean").textContent = `Grad-CAM (${r.gradcam.model}, malignant), original`;
    $("cap-cam-adv").textContent = `Grad-CAM (${r.gradcam.model}, malignant), adversarial`;
  } else {
    $("cap-cam-clean").textContent = r.gradcam ? r.gradcam.error : "no Grad-CAM";
  }
  renderPredictions(r.clean, r.adversarial);
  const dl = $("download");
  dl.href = png(r.images.adversarial);
  dl.download = `adversarial-${a.name}-eps${a.eps_255}-seed${a.seed}-${a.model}.png`;
  dl.classList.remove("hidden");
  const flips = r.adversarial.filter((p, i) => p.class !== r.clean[i].class).length;
  $("attack-summary").textContent = `${a.description}; ${flips} of ${r.adversarial.length} model(s) changed their class; ` +
    `${r.perturbation.changed_pixels} pixels changed, L2 ${r.perturbation.l2.toFixed(3)}.`;
}

async function cancelJob() {
  if (!state.job) return;
  try { await api(`/api/v1/jobs/${state.job}/cancel`, { method: "POST" }); } catch (e) { /* finished */ }
}

async function runCertify() {
  const fd = new FormData();
  fd.append("file", state.tile, state.tileName);
  fd.append("sigma", $("sigma").value);
  fd.append("n", $("cert-n").value);
  fd.append("model", $("cert-model").value);
  setStatus("cert-status", "queued…");
  $("cert-result").innerHTML = "";
  try {
    const r = await runJob("/api/v1/certify", fd, $("cert-progress"), "cert-status", $("run-certify"));
    $("cert-result").innerHTML =
      `<table><tr><td>smoothed prediction</td><td><span class="${esc(r.prediction)}">${esc(r.prediction)}</span></td></tr>` +
      `<tr><td>certified L2 radius</td><td>${r.radius.toFixed(4)}</td></tr>` +
      `<tr><td>≈ L∞ radius</td><td>${r.radius_linf_255.toFixed(3)}/255</td></tr>` +
      `<tr><td>base prediction</td><td>${esc(r.base_prediction)}</td></tr>` +
      `<tr><td>σ, n, α</td><td>${r.sigma}, ${r.n}, ${r.alpha}</td></tr></table>`;
    setStatus("cert-status", `done in ${r.seconds.toFixed(2)} s (${r.model})`);
  } catch (e) {
    setStatus("cert-status", e.message, true);
  }
}

async function init() {
  try {
    const h = await api("/health");
    $("health").textContent = `${h.models.length} model(s) loaded`;
    const info = await api("/api/v1/models");
    state.models = info.models;
    for (const a of info.attacks) state.attacks[a.name] = a;
    $("attack").innerHTML = info.attacks.map((a) => `<option value="${esc(a.name)}">${esc(a.name)}</option>`).join("");
    const opts = info.models.map((m) => `<option value="${esc(m.name)}">${esc(m.name)} (${esc(m.architecture)}${m.defense ? ", " + esc(m.defense) : ""})</option>`).join("");
    $("target-model").innerHTML = opts;
    $("cert-model").innerHTML = opts;
    const smooth = info.models.find((m) => m.smoothing_sigma);
    if (smooth) { $("cert-model").value = smooth.name; $("sigma").value = smooth.smoothing_sigma; }
    $("attack").value = "fgsm";
    onAttackChange();
    const ex = await api("/api/v1/examples");
    $("examples").innerHTML = ex.examples.map((e) =>
      `<img src="${e.url}" alt="example ${e.id} (${e.label})" title="synthetic ${e.label}" data-id="${e.id}" data-url="${e.url}">`).join("");
    for (const img of $("examples").querySelectorAll("img")) {
      img.addEventListener("click", async () => {
        const blob = await (await fetch(img.dataset.url)).blob();
        useTile(blob, `example-${img.dataset.id}.png`);
      });
    }
  } catch (e) {
    setStatus("tile-status", `cannot reach the server: ${e.message}`, true);
  }
}

$("upload").addEventListener("change", (ev) => {
  const f = ev.target.files[0];
  if (f) useTile(f, f.name);
});
$("attack").addEventListener("change", onAttackChange);
$("eps").addEventListener("input", onEps);
$("run-attack").addEventListener("click", runAttack);
$("cancel").addEventListener("click", cancelJob);
$("run-certify").addEventListener("click", runCertify);
init();
