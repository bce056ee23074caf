// Voices (#/voices): every voice GET /voices lists, searched and filtered by base model and
// kind; a short sample streamed with that voice (POST /speak, pcm), a link into the playground,
// and delete (admin) behind a confirm step.
import { getJSON, request } from "../api.js";
import { StreamPlayer, playPcmStream } from "../audio.js";
import { el, field, guarded, showProblem } from "../ui.js";

// A short sample: a sentence, capped at about 3 s of audio (12.5 codec frames a second).
const SAMPLE_FRAMES = 36;
const sampleText = (name) => `Hello, this is the voice ${name}.`;

/** Words for a voice's similarity (from a fine-tune job's quality report, kept in its meta). */
function similarity(meta) {
  if (typeof meta.similarity === "number") {
    const base =
      typeof meta.similarity_baseline === "number"
        ? ` (untrained ${meta.similarity_baseline.toFixed(3)})`
        : "";
    return `${meta.similarity.toFixed(3)}${base}`;
  }
  if (meta.similarity_reason) return `not measured: ${meta.similarity_reason}`;
  return "–";
}

function language(voice) {
  return voice.default_language || voice.meta?.conditioning?.language || "–";
}

function matches(voice, query, model, kind) {
  if (model && voice.base_model !== model) return false;
  if (kind && voice.kind !== kind) return false;
  if (!query) return true;
  const haystack = `${voice.name} ${JSON.stringify(voice.meta || {})}`.toLowerCase();
  return haystack.includes(query.toLowerCase());
}

function options(select, label, values, current) {
  select.replaceChildren(
    el("option", { value: "" }, label),
    ...values.map((v) => el("option", { value: v, selected: v === current }, v)),
  );
  select.value = values.includes(current) ? current : "";
}

export async function render(view) {
  let voices = [];
  let speaking = new Set(); // the speech models: what /speak can play
  let playing = null; // { name, player, controller }

  const search = el("input", {
    type: "search",
    id: "voices-search",
    placeholder: "name or meta",
    autocomplete: "off",
  });
  const modelFilter = el("select", { id: "voices-model" });
  const kindFilter = el("select", { id: "voices-kind" });
  const count = el("p", { id: "voices-count", role: "status", "aria-live": "polite" });
  const body = el("tbody");
  const table = el(
    "table",
    { id: "voices-table" },
    el("caption", { class: "visually-hidden" }, "Voices"),
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ["Name", "Kind", "Language", "Base model", "Similarity", "Availability", "Actions"].map(
          (h) => el("th", { scope: "col" }, h),
        ),
      ),
    ),
    body,
  );
  const samples = el("output", { id: "voices-samples", for: "voices-table" }, "0");
  const playStatus = el(
    "p",
    { id: "voices-playing", role: "status", "aria-live": "polite" },
    "Nothing playing.",
  );
  const status = el("p", { id: "voices-status", role: "status", "aria-live": "polite" });

  view.append(
    el("h2", {}, "Voices"),
    el(
      "div",
      { class: "row", role: "search" },
      field("Search", search, "matches the name and the voice's meta"),
      field("Base model", modelFilter),
      field("Kind", kindFilter),
    ),
    count,
    table,
    el("div", { class: "figures" }, el("span", {}, "Samples decoded: ", samples), playStatus),
    status,
  );

  let lastPlayer = null; // kept playing out its last chunks after the stream ended

  function stopPlaying() {
    playing?.controller.abort();
    playing = null;
    lastPlayer?.close().catch(() => {});
    lastPlayer = null;
  }

  async function play(voice) {
    const wasMine = playing?.name === voice.name;
    stopPlaying();
    if (wasMine) {
      playStatus.textContent = `Stopped ${voice.name}.`;
      paint();
      return;
    }
    const player = new StreamPlayer();
    const controller = new AbortController();
    const mine = { name: voice.name, controller };
    playing = mine;
    lastPlayer = player;
    paint();
    samples.textContent = "0";
    playStatus.textContent = `Asking for ${voice.name}…`;
    const total = await guarded(async () => {
      await player.resume();
      const response = await request("POST", "/speak", {
        json: {
          speaker: voice.name,
          text: sampleText(voice.name),
          stream: true,
          format: "pcm",
          max_tokens: SAMPLE_FRAMES,
        },
        signal: controller.signal,
      });
      return playPcmStream(response, player, (_, n) => {
        samples.textContent = String(n);
        playStatus.textContent = `Playing ${voice.name}…`;
      });
    });
    if (playing !== mine) return; // stopped, or another voice took over
    playing = null;
    playStatus.textContent =
      total === undefined
        ? `${voice.name} did not play.`
        : `${voice.name}: ${(total / player.sampleRate).toFixed(2)} s played.`;
    paint();
  }

  function confirmDelete(voice, cell) {
    const yes = el(
      "button",
      { type: "button", class: "danger", "aria-label": `Yes, delete ${voice.name}` },
      "Yes, delete",
    );
    const no = el("button", { type: "button", "aria-label": `Keep ${voice.name}` }, "Keep");
    const prompt = el(
      "span",
      { class: "confirm", role: "group", "aria-label": `Confirm deleting ${voice.name}` },
      `Delete ${voice.name}? This cannot be undone. `,
      yes,
      " ",
      no,
    );
    cell.replaceChildren(prompt);
    no.focus();
    const back = () => {
      paint();
      for (const tr of body.querySelectorAll("tr")) {
        if (tr.dataset.voice === voice.name) tr.querySelector(".delete")?.focus();
      }
    };
    no.addEventListener("click", back);
    yes.addEventListener("click", async () => {
      yes.disabled = true;
      no.disabled = true;
      const path = `/voices/${encodeURIComponent(voice.name)}`;
      const gone = await guarded(() => request("DELETE", path));
      if (gone) {
        status.textContent = `Deleted ${voice.name}.`;
        await load();
      } else {
        await load().catch(() => {}); // gone already? the list says so now
        back();
      }
    });
  }

  function row(voice) {
    const actions = el("td", { class: "actions" });
    const canPlay = voice.available && speaking.has(voice.base_model);
    const playButton = el(
      "button",
      {
        type: "button",
        class: "play",
        "aria-label": `${playing?.name === voice.name ? "Stop" : "Play"} ${voice.name}`,
        disabled: !canPlay,
        title: canPlay
          ? undefined
          : voice.kind === "duplex"
            ? "a duplex voice talks on the Conversation page"
            : "this voice cannot speak here",
      },
      playing?.name === voice.name ? "Stop" : "Play",
    );
    playButton.addEventListener("click", () => play(voice));
    const use = el(
      "a",
      {
        class: "use",
        href: `#/playground?voice=${encodeURIComponent(voice.name)}`,
        "aria-label": `Use ${voice.name} in the playground`,
      },
      "Use in playground",
    );
    const del = el(
      "button",
      { type: "button", class: "delete", "aria-label": `Delete ${voice.name}` },
      "Delete",
    );
    del.addEventListener("click", () => confirmDelete(voice, actions));
    actions.append(playButton, " ", ...(canPlay ? [use, " "] : []), del);
    const availability = voice.available
      ? el("span", { class: "ok" }, "available")
      : el("span", { class: "error" }, `unavailable: ${voice.unavailable_reason || "unknown"}`);
    return el(
      "tr",
      { dataset: { voice: voice.name, kind: voice.kind, model: voice.base_model } },
      el("th", { scope: "row" }, voice.name),
      el("td", {}, voice.kind),
      el("td", {}, language(voice)),
      el("td", {}, voice.base_model),
      el("td", { class: "similarity" }, similarity(voice.meta || {})),
      el("td", {}, availability),
      actions,
    );
  }

  function paint() {
    const shown = voices.filter((v) =>
      matches(v, search.value.trim(), modelFilter.value, kindFilter.value),
    );
    // Keep keyboard focus on the same control of the same voice across a repaint.
    const focused = body.contains(document.activeElement) ? document.activeElement : null;
    const focusVoice = focused?.closest("tr")?.dataset.voice;
    const focusClass = focused?.classList[0];
    body.replaceChildren(...shown.map(row));
    if (focusVoice && focusClass) {
      for (const tr of body.querySelectorAll("tr")) {
        if (tr.dataset.voice === focusVoice) tr.querySelector(`.${focusClass}`)?.focus();
      }
    }
    if (!voices.length) {
      body.append(el("tr", {}, el("td", { colspan: 7 }, "No voices yet: clone or fine-tune one.")));
    } else if (!shown.length) {
      body.append(el("tr", {}, el("td", { colspan: 7 }, "No voice matches.")));
    }
    count.textContent = `${shown.length} of ${voices.length} voices shown.`;
  }

  async function load() {
    const [listed, models] = await Promise.all([
      getJSON("/voices"),
      getJSON("/models").catch(() => null), // without it: every voice offered, the server says no
    ]);
    voices = listed.voices;
    speaking = new Set(
      models ? models.models.map((m) => m.name) : voices.map((v) => v.base_model),
    );
    const uniq = (key) => [...new Set(voices.map((v) => v[key]))].sort();
    options(modelFilter, "All base models", uniq("base_model"), modelFilter.value);
    options(kindFilter, "All kinds", uniq("kind"), kindFilter.value);
    paint();
  }

  for (const control of [search, modelFilter, kindFilter]) {
    control.addEventListener(control === search ? "input" : "change", paint);
  }

  try {
    await load();
  } catch (err) {
    showProblem(err);
    count.textContent = "The voices could not be listed.";
  }
  return () => stopPlaying();
}
