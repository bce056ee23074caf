// One fine-tune job (#/job/ID), followed live through GET /jobs/ID/events (server-sent events,
// read with fetch so the key header goes along): state and phase, a progress bar with the ETA,
// the loss curve, similarity per checkpoint with its preview, the log, cancel; on success a
// link to the new voice. A stream that ends before the job does is reopened (after a GET
// /jobs/ID); leaving the page aborts it.
import { getJSON, readEvents, request } from "../api.js";
import { el, guarded, showProblem } from "../ui.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATE_WORDS = {
  queued: "Queued: waiting for the trainer",
  preparing: "Preparing",
  training: "Training",
  baking: "Baking the voice",
  succeeded: "Succeeded",
  failed: "Failed",
  cancelled: "Cancelled",
  interrupted: "Interrupted: resumes when the server starts again",
};
const PHASE_WORDS = {
  validate: "checking the clips",
  preprocess: "encoding the audio",
  training: "training",
  baking: "baking the voice",
  packaging: "packaging the voice",
};
const LOG_LINES = 300;

function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const m = Math.floor(s / 60);
  return m ? `${m} min ${String(s % 60).padStart(2, "0")} s` : `${s} s`;
}

function cssVar(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

/** One loss's curve by step on a canvas, on its own axis; `data-points` counts its points. */
function drawLoss(canvas, points, name) {
  const width = (canvas.width = canvas.clientWidth || 600);
  const height = (canvas.height = canvas.clientHeight || 180);
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  const series = points.filter((p) => Number.isFinite(p.losses[name]));
  canvas.dataset.points = String(series.length);
  canvas.setAttribute(
    "aria-label",
    series.length
      ? `${name} by step: ${series.length} points, from ${series[0].losses[name].toFixed(4)} at step ${series[0].step} to ${series.at(-1).losses[name].toFixed(4)} at step ${series.at(-1).step}`
      : `${name} by step: no points yet`,
  );
  if (!series.length) return;
  const values = series.map((p) => p.losses[name]);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-9) {
    lo -= 0.5;
    hi += 0.5;
  }
  const first = series[0].step;
  const last = series.at(-1).step;
  const pad = { left: 56, right: 10, top: 10, bottom: 20 };
  const x = (step) =>
    pad.left + (last === first ? 0.5 : (step - first) / (last - first)) * (width - pad.left - pad.right);
  const y = (v) => pad.top + (1 - (v - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = cssVar("--muted", "#4a5361");
  g.fillText(hi.toPrecision(5), 4, pad.top + 8);
  g.fillText(lo.toPrecision(5), 4, height - pad.bottom);
  g.fillText(`step ${first}`, pad.left, height - 5);
  const lastLabel = `step ${last}`;
  g.fillText(lastLabel, width - pad.right - g.measureText(lastLabel).width, height - 5);
  const color = cssVar("--accent", "#0b5cad");
  g.strokeStyle = color;
  g.fillStyle = color;
  g.lineWidth = 2;
  g.beginPath();
  series.forEach((p, i) => {
    if (i === 0) g.moveTo(x(p.step), y(p.losses[name]));
    else g.lineTo(x(p.step), y(p.losses[name]));
  });
  g.stroke();
  for (const p of series) g.fillRect(x(p.step) - 2, y(p.losses[name]) - 2, 4, 4);
}

export async function render(view, { id }) {
  if (!id) {
    view.append(
      el("h2", {}, "Job"),
      el("p", {}, "No job named. Pick one on the ", el("a", { href: "#/jobs" }, "Jobs"), " page."),
    );
    return undefined;
  }
  const controller = new AbortController();
  const urls = new Set();
  let retryTimer = null;
  let job = { id, state: "queued", quality: [], log_tail: [] };
  let phase = null;
  const losses = new Map(); // step -> {loss, main, ...}
  const log = [];

  // --- the page ------------------------------------------------------------------------------
  const title = el("h2", {}, "Job ", el("code", {}, id));
  const state = el("strong", { id: "job-state" }, "…");
  const phaseText = el("span", { id: "job-phase" });
  const stateLine = el("p", { role: "status", "aria-live": "polite" }, "State: ", state, " ", phaseText);
  const progress = el("progress", { id: "job-progress", max: 1, value: 0 });
  const stepText = el("output", { id: "job-step" }, "–");
  const eta = el("output", { id: "job-eta" }, "–");
  const lossNow = el("output", { id: "job-loss-now" }, "–");
  const stream = el("span", { id: "job-stream", class: "hint" });
  const canvas = el("canvas", { id: "job-loss", role: "img", "aria-label": "Training loss by step", dataset: { points: "0" } });
  const curveSelect = el("select", { id: "job-curve" }, el("option", { value: "loss" }, "loss (total)"));
  curveSelect.addEventListener("change", () => drawCurve());
  const legend = el("ul", { id: "job-loss-legend", class: "job-legend", "aria-label": "Latest losses" });
  const qualityBody = el("tbody", { id: "job-quality" });
  const qualityTable = el(
    "table",
    {},
    el("caption", { class: "visually-hidden" }, "Similarity to the uploaded voice per checkpoint"),
    el(
      "thead",
      {},
      el("tr", {}, el("th", { scope: "col" }, "Step"), el("th", { scope: "col" }, "Similarity"), el("th", { scope: "col" }, "Preview")),
    ),
    qualityBody,
  );
  const qualityNone = el("p", { class: "hint" }, "No checkpoint measured yet.");
  const reason = el("p", { id: "job-reason", class: "error", role: "alert", hidden: true });
  const voiceLine = el("p", { id: "job-voice", class: "ok", hidden: true });
  const logBox = el("pre", { id: "job-log", class: "log", tabindex: "0", "aria-label": "Job log" });
  const cancel = el("button", { type: "button", id: "job-cancel" }, "Cancel job");
  const meta = el("p", { id: "job-meta", class: "hint" });

  view.append(
    title,
    meta,
    stateLine,
    el("label", { for: "job-progress" }, "Progress"),
    progress,
    el(
      "div",
      { class: "figures" },
      el("span", {}, "Step ", stepText),
      el("span", {}, "Time left ", eta),
      el("span", {}, "Loss ", lossNow),
      stream,
    ),
    reason,
    voiceLine,
    el("div", { class: "row" }, cancel),
    el("h3", {}, "Loss"),
    el("div", { class: "row" }, el("label", { for: "job-curve" }, "Curve"), curveSelect),
    canvas,
    legend,
    el("h3", {}, "Similarity per checkpoint"),
    qualityNone,
    qualityTable,
    el("h3", {}, "Log"),
    logBox,
  );

  // --- showing what is known -------------------------------------------------------------------
  function addLog(line) {
    log.push(line);
    if (log.length > LOG_LINES) log.splice(0, log.length - LOG_LINES);
    const atEnd = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    logBox.textContent = log.join("\n");
    if (atEnd) logBox.scrollTop = logBox.scrollHeight;
  }

  function drawCurve() {
    const points = [...losses.entries()].sort((a, b) => a[0] - b[0]).map(([step, l]) => ({ step, losses: l }));
    const names = [...new Set(points.flatMap((p) => Object.keys(p.losses)))];
    for (const name of names) {
      if (![...curveSelect.options].some((o) => o.value === name)) curveSelect.append(el("option", { value: name }, name));
    }
    drawLoss(canvas, points, curveSelect.value);
    const latest = points.at(-1)?.losses || {};
    legend.replaceChildren(
      ...names.map((name) =>
        el("li", { class: name === curveSelect.value ? "shown" : null }, `${name}: `, el("strong", {}, Number.isFinite(latest[name]) ? latest[name].toFixed(4) : "–")),
      ),
    );
  }

  function showQuality() {
    const curve = job.quality || [];
    qualityNone.hidden = curve.length > 0;
    qualityTable.hidden = curve.length === 0;
    const have = new Map([...qualityBody.children].map((row) => [row.dataset.step, row]));
    for (const point of curve) {
      const key = String(point.step);
      const similarity =
        point.similarity === null || point.similarity === undefined
          ? `not measured${point.reason ? `: ${point.reason}` : ""}`
          : point.similarity.toFixed(3);
      const existing = have.get(key);
      if (existing && existing.dataset.similarity === similarity) continue;
      const cell = el("td", {});
      if (point.preview) {
        const play = el("button", { type: "button", class: "job-preview", dataset: { step: key } }, `Play step ${point.step}`);
        play.addEventListener("click", () =>
          guarded(async () => {
            play.disabled = true;
            try {
              const response = await request("GET", `/jobs/${encodeURIComponent(id)}/previews/${point.step}`, { signal: controller.signal });
              const url = URL.createObjectURL(await response.blob());
              urls.add(url);
              const audio = el("audio", { controls: true, src: url, "aria-label": `Preview at step ${point.step}` });
              cell.replaceChildren(audio);
              await audio.play();
            } finally {
              play.disabled = false;
            }
          }),
        );
        cell.append(play);
      } else {
        cell.append("–");
      }
      const row = el("tr", { dataset: { step: key, similarity } }, el("th", { scope: "row" }, key), el("td", {}, similarity), cell);
      if (existing) existing.replaceWith(row);
      else qualityBody.append(row);
    }
  }

  function showJob() {
    state.textContent = STATE_WORDS[job.state] || job.state;
    state.dataset.state = job.state;
    state.className = job.state === "succeeded" ? "ok" : job.state === "failed" ? "error" : "";
    const active = ["preparing", "training", "baking"].includes(job.state);
    phaseText.textContent = active && phase ? `(${PHASE_WORDS[phase] || phase})` : "";
    if (job.name) title.replaceChildren("Job ", el("code", {}, id), `: voice ${job.name}`);
    const parts = [job.base_model && `base model ${job.base_model}`, job.strategy && `strategy ${job.strategy}`, job.clips && `${job.clips} clips`];
    meta.textContent = parts.filter(Boolean).join(" · ");
    const total = job.total_steps || 0;
    if (total) {
      progress.max = total;
      progress.value = Math.min(job.step || 0, total);
      stepText.textContent = `${job.step || 0} of ${total}`;
    } else if (job.state === "succeeded") {
      progress.max = 1;
      progress.value = 1;
    } else {
      progress.removeAttribute("value"); // indeterminate until the trainer says how many steps
    }
    progress.setAttribute("aria-valuetext", total ? `step ${job.step || 0} of ${total}` : STATE_WORDS[job.state] || job.state);
    eta.textContent = TERMINAL.has(job.state) ? "–" : duration(job.eta_s);
    const current = job.losses?.loss;
    lossNow.textContent = Number.isFinite(current) ? current.toFixed(4) : "–";
    reason.hidden = !(job.state === "failed" && job.reason);
    reason.textContent = job.reason ? `Why: ${job.reason}` : "";
    if (job.state === "succeeded" && job.voice) {
      voiceLine.replaceChildren(
        "The new voice ",
        el("strong", {}, job.voice),
        " is ready: ",
        el("a", { href: `#/playground?voice=${encodeURIComponent(job.voice)}`, id: "job-voice-link" }, `try ${job.voice} in the playground`),
        ".",
      );
      voiceLine.hidden = false;
    }
    if (job.note) meta.textContent += ` · ${job.note}`;
    cancel.disabled = TERMINAL.has(job.state);
    cancel.hidden = TERMINAL.has(job.state);
    showQuality();
  }

  function merge(fields) {
    const { event: _kind, ...rest } = fields;
    job = { ...job, ...rest };
    if (rest.step !== undefined && rest.losses && Object.keys(rest.losses).length) {
      losses.set(rest.step, rest.losses);
      drawCurve();
    }
    if (Array.isArray(rest.log_tail) && rest.log_tail.length) {
      addLog("— trainer output —");
      for (const line of rest.log_tail) addLog(line);
    }
  }

  function onEvent(event) {
    switch (event.event) {
      case "state":
        if (event.state !== job.state) addLog(`state: ${event.state}${event.reason ? ` (${event.reason})` : ""}`);
        merge(event);
        break;
      case "phase":
        phase = event.phase;
        addLog(`phase: ${event.phase}`);
        break;
      case "start":
        job.total_steps = event.total_steps;
        job.step = event.step;
        addLog(`start at step ${event.step} of ${event.total_steps} (${event.trainable_parameters} trainable parameters)`);
        break;
      case "step": {
        const { event: _e, time: _t, step, total_steps: total, epoch, lr, samples_per_s: _s, eta_s: etaS, grad_norm: _g, ...parts } = event;
        const stepLosses = Object.fromEntries(Object.entries(parts).filter(([, v]) => Number.isFinite(v)));
        job.step = step;
        job.total_steps = total;
        job.eta_s = etaS;
        job.losses = stepLosses;
        losses.set(step, stepLosses);
        drawCurve();
        addLog(`step ${step}/${total} epoch ${epoch} loss ${stepLosses.loss?.toFixed(4)} lr ${lr.toExponential(2)}`);
        break;
      }
      case "quality":
        job.quality = [...(job.quality || []).filter((q) => q.step !== event.step), { step: event.step, similarity: event.similarity, preview: event.preview, reason: event.reason }].sort((a, b) => a.step - b.step);
        addLog(`quality at step ${event.step}: similarity ${event.similarity ?? `not measured (${event.reason})`}`);
        break;
      case "eval":
        addLog(`eval at step ${event.step}: val loss ${event.val_loss.toFixed(4)}${event.improved ? " (best)" : ""}`);
        break;
      case "failed":
        job.reason = event.reason;
        addLog(`failed: ${event.reason}`);
        break;
      default: {
        const { event: kind, time: _t, ...rest } = event;
        const detail = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
        addLog(`${kind}${detail ? `: ${detail}` : ""}`);
      }
    }
    showJob();
  }

  // --- following the stream ------------------------------------------------------------------
  let failures = 0;
  async function follow() {
    retryTimer = null;
    if (controller.signal.aborted) return;
    stream.textContent = "live";
    try {
      await readEvents(`/jobs/${encodeURIComponent(id)}/events`, onEvent, { signal: controller.signal });
      failures = 0;
    } catch (err) {
      if (err?.name === "AbortError" || controller.signal.aborted) return;
      if (err?.status === 404 || err?.status === 401 || err?.status === 403) {
        stream.textContent = "";
        showProblem(err);
        return;
      }
      failures += 1;
      addLog(`the event stream broke (${err.message}); reconnecting`);
    }
    if (controller.signal.aborted) return;
    if (TERMINAL.has(job.state)) {
      stream.textContent = "";
      // The last word: the job's full record (log tail, quality curve, voice).
      await guarded(async () => {
        const final = await getJSON(`/jobs/${encodeURIComponent(id)}`, { signal: controller.signal });
        const hadTail = job.log_tail?.length;
        job = { ...job, ...final };
        if (!hadTail && final.log_tail?.length) merge({ log_tail: final.log_tail });
        showJob();
      });
      return;
    }
    // Ended before the job did (a restart, a proxy's timeout): look again, then reopen.
    const wait = Math.min(10_000, 1000 * 2 ** Math.min(failures, 4));
    stream.textContent = `reconnecting in ${Math.round(wait / 1000)} s`;
    retryTimer = setTimeout(() => {
      guarded(async () => {
        const fresh = await getJSON(`/jobs/${encodeURIComponent(id)}`, { signal: controller.signal });
        merge(fresh);
        showJob();
      }).finally(follow);
    }, wait);
  }

  cancel.addEventListener("click", () =>
    guarded(async () => {
      cancel.disabled = true;
      try {
        const answer = await request("DELETE", `/jobs/${encodeURIComponent(id)}`, { signal: controller.signal });
        merge(await answer.json());
        addLog("cancel asked for");
        showJob();
      } finally {
        cancel.disabled = TERMINAL.has(job.state);
      }
    }),
  );

  const redraw = () => drawCurve();
  window.addEventListener("resize", redraw);
  showJob();
  drawCurve();
  follow();

  return () => {
    controller.abort();
    clearTimeout(retryTimer);
    window.removeEventListener("resize", redraw);
    for (const audio of view.querySelectorAll("audio")) audio.pause();
    for (const url of urls) URL.revokeObjectURL(url);
  };
}
