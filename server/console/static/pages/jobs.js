// Jobs (#/jobs): every fine-tune job (GET /jobs, admin) with its state, progress and reason;
// each links to its own page (#/job/ID). Refreshed every few seconds while the page is open.
import { getJSON } from "../api.js";
import { clearProblem, el, showProblem } from "../ui.js";

const REFRESH_MS = 3000;
const ACTIVE = new Set(["queued", "preparing", "training", "baking"]);

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function progress(job) {
  const total = job.total_steps;
  const step = job.step || 0;
  const label = total ? `step ${step} of ${total}` : `step ${step}`;
  const bar = el("progress", { max: total || 1, "aria-label": `${job.name}: ${label}` });
  if (total) bar.value = Math.min(step, total);
  else if (job.state === "succeeded") bar.value = 1;
  else if (!ACTIVE.has(job.state)) bar.value = 0;
  // An active job with no total yet: an indeterminate bar (no value).
  return el("td", { class: "progress" }, bar, el("span", { class: "hint" }, label));
}

function row(job) {
  const state = el("span", { class: `state state-${job.state}` }, job.state);
  return el(
    "tr",
    { dataset: { job: job.id, state: job.state } },
    el(
      "th",
      { scope: "row" },
      el(
        "a",
        { href: `#/job/${encodeURIComponent(job.id)}`, "aria-label": `Job ${job.name}` },
        job.name,
      ),
    ),
    el("td", { class: "job-state" }, state),
    progress(job),
    el("td", {}, job.strategy || "–"),
    el("td", {}, job.base_model || "–"),
    el(
      "td",
      { class: job.state === "failed" ? "reason error" : "reason" },
      job.reason || job.note || "",
    ),
    el("td", {}, el("time", { datetime: job.updated_at || "" }, when(job.updated_at))),
  );
}

export async function render(view) {
  const status = el("p", { id: "jobs-status", role: "status", "aria-live": "polite" });
  const body = el("tbody");
  const table = el(
    "table",
    { id: "jobs-table" },
    el("caption", { class: "visually-hidden" }, "Fine-tune jobs"),
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ["Name", "State", "Progress", "Strategy", "Base model", "Reason", "Updated"].map((h) =>
          el("th", { scope: "col" }, h),
        ),
      ),
    ),
    body,
  );
  const empty = el(
    "p",
    { id: "jobs-empty", hidden: true },
    "No fine-tune jobs yet. ",
    el("a", { href: "#/finetune" }, "Start one on the Fine-tune page"),
    ".",
  );
  view.append(el("h2", {}, "Jobs"), status, empty, table);

  let timer = null;
  let stopped = false;
  let failing = false;

  async function refresh() {
    try {
      const { jobs } = await getJSON("/jobs");
      if (stopped) return;
      jobs.sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""));
      body.replaceChildren(...jobs.map(row));
      empty.hidden = jobs.length > 0;
      table.hidden = jobs.length === 0;
      const active = jobs.filter((j) => ACTIVE.has(j.state)).length;
      status.textContent =
        `${jobs.length} job${jobs.length === 1 ? "" : "s"}, ${active} active; ` +
        `updated ${new Date().toLocaleTimeString()}.`;
      if (failing) clearProblem(); // the server answers again
      failing = false;
    } catch (err) {
      if (stopped) return;
      if (!failing) showProblem(err); // once, not every few seconds
      failing = true;
      if (err.status === 401 || err.status === 403) {
        // Asking again will not help: saving a key renders the page again.
        status.textContent = "The jobs need an admin key.";
        return;
      }
      status.textContent = "The jobs could not be listed; trying again.";
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }

  await refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
