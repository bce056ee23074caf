// Playground (#/playground?voice=NAME): text, voice, language, instruct, seed and sampling ->
// POST /speak streamed as 16-bit PCM, played as each chunk arrives, drawn as it grows; time to
// first audio and real-time factor measured in the page; download as WAV (what arrived) or in
// another format (asked again with the same seed).
import { getJSON, request } from "../api.js";
import { StreamPlayer, drawWaveform, playPcmStream, wavBlob } from "../audio.js";
import { el, field, guarded } from "../ui.js";

const DEFAULT_TEXT = "Hello! This is the voicefoundry playground, speaking as the audio arrives.";
const MAX_SEED = 2 ** 32 - 1;
const EXTENSIONS = { wav: "wav", mp3: "mp3", flac: "flac", opus: "ogg", aac: "aac", pcm: "pcm" };

// The sampling fields, with the bounds the server checks (server/schemas.py).
const SAMPLING = [
  { key: "temperature", label: "Temperature", min: 0, max: 10, step: "any", hint: "0–10" },
  { key: "top_p", label: "Top p", min: 0.001, max: 1, step: "any", hint: "above 0, up to 1" },
  { key: "top_k", label: "Top k", min: 0, max: 1_000_000, step: 1, hint: "0–1,000,000" },
  {
    key: "repetition_penalty",
    label: "Repetition penalty",
    min: 0.001,
    max: 10,
    step: "any",
    hint: "above 0, up to 10",
  },
  {
    key: "max_tokens",
    label: "Max frames per sentence",
    min: 1,
    max: 1_000_000,
    step: 1,
    hint: "12.5 frames a second of audio; blank: the server's limit",
  },
];

function numberInput(id, { min, max, step }) {
  return el("input", { id, type: "number", min, max, step, inputmode: "decimal" });
}

function output(id, label) {
  const out = el("output", { id }, "–");
  return { out, node: el("span", { class: "figure" }, `${label}: `, out) };
}

export async function render(view, { params }) {
  const [listed, info] = await Promise.all([
    getJSON("/voices"),
    getJSON("/models").catch(() => null), // an older server: the fields stay open, it says no
  ]);
  const models = new Map((info?.models || []).map((m) => [m.name, m]));
  const voices = listed.voices.filter((v) => v.available && (!info || models.has(v.base_model)));
  const formats = info?.formats || ["wav", "mp3", "flac", "opus"];

  // --- the form ------------------------------------------------------------------------------
  const text = el("textarea", { id: "pg-text", required: true, rows: 4 }, DEFAULT_TEXT);
  const voice = el("select", { id: "pg-voice", required: true });
  const byModel = new Map();
  for (const v of voices) {
    if (!byModel.has(v.base_model)) byModel.set(v.base_model, []);
    byModel.get(v.base_model).push(v);
  }
  for (const [model, list] of [...byModel].sort(([a], [b]) => a.localeCompare(b))) {
    voice.append(
      el(
        "optgroup",
        { label: model },
        list.map((v) => el("option", { value: v.name }, `${v.name} (${v.kind})`)),
      ),
    );
  }
  const wanted = params.get("voice");
  const note = el("p", { id: "pg-note", class: "hint", role: "status" });
  if (wanted && voices.some((v) => v.name === wanted)) voice.value = wanted;
  else if (wanted) note.textContent = `Voice ${wanted} is not one this server can speak with here.`;
  if (!voices.length) note.textContent = "No voice can speak here yet: clone or fine-tune one.";

  const language = el("select", { id: "pg-language" });
  const languageHint = el("span", { class: "hint", id: "pg-language-hint" });
  const instruct = el("textarea", { id: "pg-instruct", rows: 2, maxlength: 2000 });
  const instructHint = el("span", { class: "hint", id: "pg-instruct-hint" });
  const seed = el("input", {
    id: "pg-seed",
    type: "number",
    min: 0,
    max: MAX_SEED,
    step: 1,
    placeholder: "random",
  });
  const sampling = Object.fromEntries(
    SAMPLING.map((s) => [s.key, numberInput(`pg-${s.key.replace("_", "-")}`, s)]),
  );

  const current = () => voices.find((v) => v.name === voice.value);

  function fitVoice() {
    const v = current();
    const model = v ? models.get(v.base_model) : null;
    // Languages: the model's own and any the voice brought (its new-language rows).
    const own = model?.languages || [];
    const brought = (v?.meta?.language_rows || []).map((r) => r.name).filter(Boolean);
    const names = [...new Set([...own, ...brought])].sort();
    const fallback = v?.default_language ? `Voice default (${v.default_language})` : "Auto";
    const previous = language.value;
    language.replaceChildren(
      el("option", { value: "" }, fallback),
      ...names.map((n) => el("option", { value: n }, n)),
    );
    language.value = names.includes(previous) ? previous : "";
    language.disabled = Boolean(info) && !names.length;
    languageHint.textContent = language.disabled
      ? `${v?.base_model || "This model"} takes no language.`
      : "";
    // Instruct: only where the model takes one ("style": how to speak; "design": the voice).
    const use = info ? model?.instruct : "unknown";
    instruct.disabled = !use;
    instruct.required = use === "design";
    if (use === "style") {
      instructHint.textContent = "How the voice speaks (e.g. “cheerful, fast”).";
    } else if (use === "design") {
      instructHint.textContent = "Describe the voice to speak in (this model needs one).";
    } else if (use === "unknown") {
      instructHint.textContent = "The server says whether it takes one.";
    } else {
      const takers = voices
        .filter((x) => models.get(x.base_model)?.instruct)
        .map((x) => x.name)
        .slice(0, 8);
      instructHint.textContent =
        `${v ? `${v.name} (model ${v.base_model})` : "This voice"} takes no instruct: only ` +
        "Qwen3-TTS CustomVoice (1.7B) and VoiceDesign models do" +
        (takers.length ? `; voices that do: ${takers.join(", ")}.` : "; none is loaded here.");
    }
  }
  voice.addEventListener("change", fitVoice);
  fitVoice();

  const speak = el("button", { type: "submit", class: "primary", id: "pg-speak" }, "Speak");
  const stop = el("button", { type: "button", id: "pg-stop", disabled: true }, "Stop");
  const form = el(
    "form",
    { id: "pg-form" },
    field("Text", text),
    el(
      "div",
      { class: "row" },
      field("Voice", voice),
      field("Language", language, languageHint),
    ),
    field("Instruct", instruct, instructHint),
    el(
      "details",
      { class: "sampling" },
      el("summary", {}, "Seed and sampling"),
      el(
        "div",
        { class: "row" },
        field("Seed", seed, "0–4294967295; blank: a random one, shown below"),
        SAMPLING.map((s) => field(s.label, sampling[s.key], s.hint)),
      ),
    ),
    el("div", { class: "row" }, speak, stop),
  );

  // --- what came back ----------------------------------------------------------------------
  const status = el("p", { id: "pg-status", role: "status", "aria-live": "polite" }, "Ready.");
  const figSamples = output("pg-samples", "Samples received");
  const figTtfa = output("pg-ttfa", "Time to first audio (s)");
  const figRtf = output("pg-rtf", "Real-time factor (wall ÷ audio)");
  const figSeconds = output("pg-seconds", "Audio (s)");
  const figSeed = output("pg-seed-used", "Seed used");
  figSamples.out.textContent = "0";
  const canvas = el("canvas", {
    id: "pg-wave",
    role: "img",
    "aria-label": "Waveform of the speech received",
  });
  const format = el(
    "select",
    { id: "pg-format" },
    formats.map((f) =>
      el(
        "option",
        { value: f },
        f === "wav" ? "wav (what arrived)" : `${f} (asked again, same seed)`,
      ),
    ),
  );
  const download = el("button", { type: "button", id: "pg-download", disabled: true }, "Download");
  const downloadStatus = el("span", { id: "pg-download-status", role: "status" });

  view.append(
    el("h2", {}, "Playground"),
    note,
    form,
    status,
    el(
      "div",
      { class: "figures" },
      figSamples.node,
      figTtfa.node,
      figRtf.node,
      figSeconds.node,
      figSeed.node,
    ),
    canvas,
    el(
      "div",
      { class: "row" },
      field("Download format", format),
      el("div", { class: "field" }, download),
      downloadStatus,
    ),
  );

  // --- speaking ------------------------------------------------------------------------------
  let run = null; // { controller, player, body }
  let lastBody = null;
  let lastPlayer = null;
  const urls = [];

  function body() {
    const out = { speaker: voice.value, text: text.value, stream: true, format: "pcm" };
    if (language.value && !language.disabled) out.language = language.value;
    if (!instruct.disabled && instruct.value.trim()) out.instruct = instruct.value;
    out.seed = seed.value === "" ? Math.floor(Math.random() * MAX_SEED) : Number(seed.value);
    for (const s of SAMPLING) {
      const value = sampling[s.key].value;
      if (value !== "") out[s.key] = Number(value);
    }
    return out;
  }

  function stopRun() {
    if (!run) return;
    run.controller.abort();
    run.player.stop();
  }

  async function speakNow() {
    stopRun();
    await lastPlayer?.close().catch(() => {});
    const sent = body();
    const player = new StreamPlayer();
    const controller = new AbortController();
    const mine = { controller, player };
    run = mine;
    lastPlayer = player;
    lastBody = null;
    speak.disabled = true;
    stop.disabled = false;
    download.disabled = true;
    figSamples.out.textContent = "0";
    for (const f of [figTtfa, figRtf, figSeconds]) f.out.textContent = "–";
    figSeed.out.textContent = String(sent.seed);
    status.textContent = `Asking ${sent.speaker} to speak…`;
    drawWaveform(canvas, new Float32Array(0));

    let drawPending = false;
    const redraw = () => {
      if (drawPending) return;
      drawPending = true;
      requestAnimationFrame(() => {
        drawPending = false;
        if (canvas.isConnected) drawWaveform(canvas, player.joined());
      });
    };

    let firstAt = null;
    const started = performance.now();
    const total = await guarded(async () => {
      await player.resume();
      const response = await request("POST", "/speak", {
        json: sent,
        signal: controller.signal,
      });
      return playPcmStream(response, player, (_, n) => {
        if (firstAt === null) {
          firstAt = performance.now();
          figTtfa.out.textContent = ((firstAt - started) / 1000).toFixed(3);
          status.textContent = `Playing ${sent.speaker}…`;
        }
        figSamples.out.textContent = String(n);
        figSeconds.out.textContent = (n / player.sampleRate).toFixed(2);
        redraw();
      });
    });
    const wall = (performance.now() - started) / 1000;
    if (run === mine) run = null;
    speak.disabled = false;
    stop.disabled = true;
    if (canvas.isConnected) drawWaveform(canvas, player.joined());
    if (total !== undefined) {
      const audio = total / player.sampleRate;
      figRtf.out.textContent = audio > 0 ? (wall / audio).toFixed(3) : "–";
      status.textContent = `Done: ${audio.toFixed(2)} s of audio in ${wall.toFixed(2)} s.`;
      lastBody = sent;
    } else if (controller.signal.aborted) {
      status.textContent = `Stopped after ${(player.samples / player.sampleRate).toFixed(2)} s.`;
    } else {
      status.textContent = "The server did not speak (see the message above).";
    }
    download.disabled = !player.samples;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    speakNow();
  });
  stop.addEventListener("click", () => {
    stopRun();
    status.textContent = "Stopped.";
  });

  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    urls.push(url);
    const link = el("a", { href: url, download: name }, name);
    link.click();
    downloadStatus.replaceChildren("Saved ", link, ".");
  }

  download.addEventListener("click", () =>
    guarded(async () => {
      const fmt = format.value;
      const stem = `${voice.value || "speech"}-${figSeed.out.textContent}`;
      if (fmt === "wav" || !lastBody) {
        // What arrived (a stopped run too), as 16-bit WAV.
        save(wavBlob(lastPlayer.joined(), lastPlayer.sampleRate), `${stem}.wav`);
        return;
      }
      download.disabled = true;
      downloadStatus.textContent = `Asking for ${fmt}…`;
      try {
        const response = await request("POST", "/speak", {
          json: { ...lastBody, stream: false, format: fmt },
        });
        save(await response.blob(), `${stem}.${EXTENSIONS[fmt] || fmt}`);
      } catch (err) {
        downloadStatus.textContent = "";
        throw err;
      } finally {
        download.disabled = false;
      }
    }),
  );

  return () => {
    stopRun();
    lastPlayer?.close().catch(() => {});
    for (const url of urls) URL.revokeObjectURL(url);
  };
}
