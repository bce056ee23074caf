// Fine-tune (#/finetune): clips (drag and drop or a file input) with a transcript each (typed in
// the table, or from a JSON {clip: text} file or a .txt per clip named after its stem), base
// model and strategy, advanced settings within the server's bounds (GET /voice-form); submit ->
// POST /voices (202) -> the job page #/job/ID follows it live.
import { getJSON, request } from "../api.js";
import { SAMPLE_RATE } from "../audio.js";
import { el, field, guarded, showProblem } from "../ui.js";

const AUDIO_NAME = /\.(wav|flac|ogg|oga|opus|mp3)$/i;

// What each setting does, in words (the server's bounds give the numbers).
const SETTINGS = {
  max_steps: ["Steps", "optimizer steps in all (the recipe's default when empty)"],
  epochs: ["Epochs", "passes over the clips (when steps are not set)"],
  learning_rate: ["Learning rate", "e.g. 0.0001"],
  lora_rank: ["LoRA rank", "size of the adapter"],
  lora_dropout: ["LoRA dropout", ""],
  batch_size: ["Batch size", "clips per step"],
  grad_accumulation: ["Gradient accumulation", "batches per optimizer step"],
  label_smoothing: ["Label smoothing", ""],
  save_every: ["Checkpoint every", "steps between checkpoints (each gets a quality report)"],
  decoder_frame_fraction: ["Decoder frame fraction", "Sesame CSM: share of frames its depth decoder trains on"],
};
const FLAG_WORDS = {
  train_code_predictor: ["Train the code predictor", "Qwen3-TTS: also adapt its code predictor"],
};
const STRATEGY_WORDS = {
  speaker: "speaker: a new voice of this speaker",
  language: "language: teach the model a language",
  duplex: "duplex: a conversation voice",
};

const stem = (name) => name.replace(/\.[^.]+$/, "");

/** A clip's length in seconds, decoded in the page; null when the browser cannot decode it. */
async function clipSeconds(file) {
  try {
    const context = new OfflineAudioContext(1, 1, SAMPLE_RATE);
    return (await context.decodeAudioData(await file.arrayBuffer())).duration;
  } catch {
    return null;
  }
}

export async function render(view) {
  const controller = new AbortController();
  const form = await guarded(() => getJSON("/voice-form", { signal: controller.signal }));
  const models = (form?.models || []).filter((m) => m.strategies.length);
  const [clipMin, clipMax] = form?.clip_seconds || [0.5, 30];

  /** @type {Map<string, {file: File, seconds: number|null, text: HTMLInputElement, row: HTMLTableRowElement}>} */
  const clips = new Map();
  const pendingTexts = new Map(); // transcripts that came before their clip: stem -> text
  let rowCounter = 0;

  // --- clips and transcripts -------------------------------------------------------------------
  const fileInput = el("input", {
    type: "file",
    id: "ft-files",
    multiple: true,
    accept: "audio/*,.wav,.flac,.ogg,.oga,.opus,.mp3,.txt,.json",
  });
  const drop = el(
    "div",
    { class: "drop", id: "ft-drop" },
    field("Clips and transcripts", fileInput, "audio clips; transcripts as a .txt per clip (same name) or one JSON {\"clip.wav\": \"text\"}"),
    el("p", { class: "hint" }, "…or drop them here."),
  );
  const tbody = el("tbody", { id: "ft-clips" });
  const table = el(
    "table",
    { id: "ft-table" },
    el("caption", { class: "visually-hidden" }, "Clips and their transcripts"),
    el(
      "thead",
      {},
      el("tr", {}, el("th", { scope: "col" }, "Clip"), el("th", { scope: "col" }, "Length"), el("th", { scope: "col" }, "Transcript"), el("th", { scope: "col" }, el("span", { class: "visually-hidden" }, "Remove"))),
    ),
    tbody,
  );
  const summary = el("p", { id: "ft-summary", role: "status", "aria-live": "polite" });

  function describeClips() {
    const all = [...clips.values()];
    const total = all.reduce((sum, c) => sum + (c.seconds || 0), 0);
    const typed = all.filter((c) => c.text.value.trim()).length;
    const model = models.find((m) => m.name === modelSelect.value);
    const least = model?.min_job_seconds?.[strategySelect.value];
    summary.textContent = all.length
      ? `${all.length} clip${all.length === 1 ? "" : "s"}, ${total.toFixed(1)} s of audio` +
        (least ? ` (this strategy needs at least ${least} s)` : "") +
        `; ${typed} of ${all.length} transcribed.`
      : "No clips yet.";
    table.hidden = !all.length;
  }

  function setTranscript(clipName, text) {
    const clip = clips.get(clipName) || [...clips.values()].find((c) => stem(c.file.name) === stem(clipName));
    if (clip) clip.text.value = text.trim();
    else pendingTexts.set(stem(clipName), text.trim());
  }

  async function addClip(file) {
    const previous = clips.get(file.name);
    if (previous) previous.row.remove(); // the same name again: the newer file
    rowCounter += 1;
    const text = el("input", { type: "text", id: `ft-text-${rowCounter}`, class: "ft-text", dataset: { clip: file.name } });
    text.value = previous?.text.value || pendingTexts.get(stem(file.name)) || "";
    pendingTexts.delete(stem(file.name));
    text.addEventListener("input", describeClips);
    const length = el("td", { class: "num" }, "…");
    const remove = el("button", { type: "button", "aria-label": `Remove ${file.name}` }, "Remove");
    const row = el(
      "tr",
      { dataset: { clip: file.name } },
      el("th", { scope: "row" }, file.name),
      length,
      el("td", {}, el("label", { for: text.id, class: "visually-hidden" }, `Transcript of ${file.name}`), text),
      el("td", {}, remove),
    );
    const entry = { file, seconds: null, text, row };
    remove.addEventListener("click", () => {
      clips.delete(file.name);
      row.remove();
      describeClips();
    });
    clips.set(file.name, entry);
    tbody.append(row);
    describeClips();
    entry.seconds = await clipSeconds(file);
    if (entry.seconds === null) {
      length.textContent = "?";
      length.title = "the browser cannot decode it; the server will say whether it can";
    } else {
      length.textContent = `${entry.seconds.toFixed(1)} s`;
      if (entry.seconds < clipMin || entry.seconds > clipMax) {
        length.classList.add("error");
        length.textContent += ` (outside ${clipMin}–${clipMax} s)`;
      }
    }
    describeClips();
  }

  async function addFiles(files) {
    const list = [...files];
    // Clips first, so .txt / JSON transcripts find their rows.
    for (const file of list.filter((f) => AUDIO_NAME.test(f.name))) await addClip(file);
    for (const file of list.filter((f) => /\.txt$/i.test(f.name))) {
      setTranscript(file.name, await file.text());
    }
    for (const file of list.filter((f) => /\.json$/i.test(f.name))) {
      let mapping;
      try {
        mapping = JSON.parse(await file.text());
      } catch (err) {
        throw new Error(`${file.name} is not valid JSON: ${err.message}`);
      }
      if (!mapping || typeof mapping !== "object" || Array.isArray(mapping)) {
        throw new Error(`${file.name} must map each clip's file name to its transcript`);
      }
      for (const [clipName, text] of Object.entries(mapping)) setTranscript(clipName, String(text));
    }
    const other = list.filter((f) => !AUDIO_NAME.test(f.name) && !/\.(txt|json)$/i.test(f.name));
    if (other.length) {
      throw new Error(`Not a clip or a transcript: ${other.map((f) => f.name).join(", ")} (clips: wav, flac, ogg, opus, mp3)`);
    }
    describeClips();
  }

  fileInput.addEventListener("change", () =>
    guarded(async () => {
      await addFiles(fileInput.files);
      fileInput.value = "";
    }),
  );
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    guarded(() => addFiles(event.dataTransfer.files));
  });

  // --- the voice -----------------------------------------------------------------------------
  const nameInput = el("input", { id: "ft-name", maxlength: 64, autocomplete: "off", spellcheck: "false" });
  const modelSelect = el(
    "select",
    { id: "ft-model" },
    models.map((m) => el("option", { value: m.name }, `${m.name} (${m.title})`)),
  );
  const strategySelect = el("select", { id: "ft-strategy" });
  const refInput = el("input", { type: "file", id: "ft-ref", accept: "audio/*,.wav,.flac,.ogg,.oga,.opus,.mp3" });
  const languageInput = el("input", { id: "ft-language", placeholder: "e.g. english" });
  const promptInput = el("textarea", { id: "ft-prompt", rows: 2, maxlength: form?.max_text_prompt_chars || 2000 });
  const promptField = field("Text prompt (optional)", promptInput, "duplex: the role the voice plays");

  function fillStrategies() {
    const model = models.find((m) => m.name === modelSelect.value);
    const keep = strategySelect.value;
    strategySelect.replaceChildren(
      ...(model?.strategies || []).map((s) => el("option", { value: s }, STRATEGY_WORDS[s] || s)),
    );
    if (model?.strategies.includes(keep)) strategySelect.value = keep;
    showStrategyFields();
  }
  function showStrategyFields() {
    promptField.hidden = strategySelect.value !== "duplex";
    describeClips();
  }
  modelSelect.addEventListener("change", fillStrategies);
  strategySelect.addEventListener("change", showStrategyFields);

  // --- advanced settings, within the server's bounds ------------------------------------------
  const settingInputs = {};
  const advanced = el("details", { id: "ft-advanced" }, el("summary", {}, "Advanced settings"));
  const grid = el("div", { class: "row" });
  for (const [key, bound] of Object.entries(form?.bounds || {})) {
    const [label, hint] = SETTINGS[key] || [key.replaceAll("_", " "), ""];
    const input = el("input", {
      type: "number",
      id: `ft-${key.replaceAll("_", "-")}`,
      name: key,
      min: bound.min,
      max: bound.max,
      step: bound.type === "int" ? 1 : "any",
      placeholder: "default",
      inputmode: bound.type === "int" ? "numeric" : "decimal",
    });
    settingInputs[key] = input;
    grid.append(field(label, input, `${hint ? `${hint}; ` : ""}${bound.min}–${bound.max}`));
  }
  for (const key of form?.flags || []) {
    const [label, hint] = FLAG_WORDS[key] || [key.replaceAll("_", " "), ""];
    const select = el(
      "select",
      { id: `ft-${key.replaceAll("_", "-")}`, name: key },
      el("option", { value: "" }, "recipe default"),
      el("option", { value: "true" }, "yes"),
      el("option", { value: "false" }, "no"),
    );
    settingInputs[key] = select;
    grid.append(field(label, select, hint));
  }
  advanced.append(grid);

  /** The settings a person set, each checked against its bounds here (the server checks too). */
  function settings() {
    const out = {};
    for (const [key, input] of Object.entries(settingInputs)) {
      const value = input.value.trim();
      if (!value) continue;
      const bound = form.bounds[key];
      if (bound) {
        const number = Number(value);
        if (!Number.isFinite(number) || (bound.type === "int" && !Number.isInteger(number))) {
          throw new Error(`${SETTINGS[key]?.[0] || key} must be ${bound.type === "int" ? "a whole number" : "a number"}`);
        }
        if (number < bound.min || number > bound.max) {
          throw new Error(`${SETTINGS[key]?.[0] || key} must be between ${bound.min} and ${bound.max}`);
        }
      }
      out[key] = value;
    }
    return out;
  }

  // --- submit ------------------------------------------------------------------------------------
  const submit = el("button", { type: "submit", class: "primary", id: "ft-submit" }, "Start fine-tuning");
  const status = el("p", { id: "ft-status", role: "status", "aria-live": "polite" });
  const formNode = el(
    "form",
    { id: "ft-form", novalidate: true },
    el("fieldset", {}, el("legend", {}, "Clips"), drop, table, summary),
    el(
      "fieldset",
      {},
      el("legend", {}, "The voice"),
      el(
        "div",
        { class: "row" },
        field("Name", nameInput, "letters, digits, - and _"),
        field("Base model", modelSelect),
        field("Strategy", strategySelect),
        field("Language (optional)", languageInput),
      ),
      field(
        "Reference clip (optional)",
        refInput,
        "the voice is served from it; without one the first clip is used",
      ),
      promptField,
    ),
    advanced,
    el("div", { class: "row" }, submit, status),
  );

  formNode.addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(async () => {
      const all = [...clips.values()];
      if (!all.length) throw new Error("Add at least one clip (drop it or choose it above).");
      const body = new FormData();
      body.append("name", nameInput.value.trim());
      body.append("base_model", modelSelect.value);
      body.append("strategy", strategySelect.value);
      if (languageInput.value.trim()) body.append("language", languageInput.value.trim());
      if (!promptField.hidden && promptInput.value.trim()) body.append("text_prompt", promptInput.value.trim());
      for (const [key, value] of Object.entries(settings())) body.append(key, value);
      body.append("transcripts", JSON.stringify(Object.fromEntries(all.map((c) => [c.file.name, c.text.value]))));
      for (const clip of all) body.append("clips", clip.file, clip.file.name);
      const ref = refInput.files[0];
      if (ref) body.append("ref", ref, ref.name);
      else if (strategySelect.value === "speaker") body.append("ref", all[0].file, all[0].file.name);
      submit.disabled = true;
      status.textContent = "Uploading…";
      try {
        const response = await request("POST", "/voices", { form: body, signal: controller.signal });
        const job = await response.json();
        status.textContent = `Job ${job.id} queued.`;
        window.location.hash = `#/job/${encodeURIComponent(job.id)}`;
      } catch (err) {
        status.textContent = "Not started.";
        throw err;
      } finally {
        submit.disabled = false;
      }
    });
  });

  view.append(
    el("h2", {}, "Fine-tune a voice"),
    el(
      "p",
      { class: "hint" },
      `Clips of ${clipMin}–${clipMax} s, each with what is said in it. For a voice from one clip without training, use `,
      el("a", { href: "#/clone" }, "Clone"),
      ".",
    ),
    formNode,
  );
  fillStrategies();
  describeClips();
  if (form && !models.length) showProblem(new Error("No loaded model can be fine-tuned here."));

  return () => controller.abort();
}
