// Clone (#/clone): one clip, uploaded or recorded from the microphone, becomes a voice at once
// (POST /voices strategy=clone, no training); then it says a sentence right here, streamed.
import { getJSON, request } from "../api.js";
import { Pcm16Decoder, SAMPLE_RATE, StreamPlayer, wavBlob } from "../audio.js";
import { el, field, guarded, showProblem } from "../ui.js";

const AUDIO_NAME = /\.(wav|flac|ogg|oga|opus|mp3)$/i;
const SENTENCE = "Hello! This is my new voice, made from a single clip.";

/** A recorded or chosen clip's length in seconds (decoded in the page); null if it cannot be. */
async function clipSeconds(blob) {
  try {
    const context = new OfflineAudioContext(1, 1, SAMPLE_RATE);
    const audio = await context.decodeAudioData(await blob.arrayBuffer());
    return audio.duration;
  } catch {
    return null; // the server says why when it is sent
  }
}

/** Microphone -> MediaRecorder; stop() gives the take as a 24 kHz mono WAV Blob. */
class Recorder {
  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false },
    });
    this.parts = [];
    this.recorder = new MediaRecorder(this.stream);
    this.recorder.addEventListener("dataavailable", (event) => {
      if (event.data.size) this.parts.push(event.data);
    });
    this.stopped = new Promise((resolve) => this.recorder.addEventListener("stop", resolve));
    this.recorder.start(250);
    this.startedAt = performance.now();
  }

  get seconds() {
    return this.startedAt ? (performance.now() - this.startedAt) / 1000 : 0;
  }

  async stop() {
    if (this.recorder.state !== "inactive") this.recorder.stop();
    await this.stopped;
    this.release();
    const recorded = new Blob(this.parts, { type: this.recorder.mimeType });
    // The browser records a compressed format the server does not read: decode it here and
    // send 16-bit WAV at the model's rate.
    const context = new OfflineAudioContext(1, 1, SAMPLE_RATE);
    const audio = await context.decodeAudioData(await recorded.arrayBuffer());
    const mono = new Float32Array(audio.length);
    for (let c = 0; c < audio.numberOfChannels; c += 1) {
      const channel = audio.getChannelData(c);
      for (let i = 0; i < mono.length; i += 1) mono[i] += channel[i] / audio.numberOfChannels;
    }
    return wavBlob(mono, audio.sampleRate);
  }

  release() {
    for (const track of this.stream?.getTracks() || []) track.stop();
  }
}

export async function render(view, { params }) {
  const controller = new AbortController();
  const urls = new Set();
  let recorder = null;
  let ticker = null;
  let player = null;
  let clip = null; // { blob, filename, seconds }

  const form = await guarded(() => getJSON("/voice-form", { signal: controller.signal }));
  const models = form?.clone.models || [];
  const limits = form?.clone || { min_seconds: 2, max_seconds: 30, max_text_chars: 2000 };

  // --- the clip: a file (input or drop) or a take from the microphone --------------------------
  const fileInput = el("input", {
    type: "file",
    id: "clone-file",
    accept: "audio/*,.wav,.flac,.ogg,.oga,.opus,.mp3",
  });
  const drop = el(
    "div",
    { class: "drop", id: "clone-drop" },
    field(`Audio clip (${limits.min_seconds}–${limits.max_seconds} s of one speaker)`, fileInput),
    el("p", { class: "hint" }, "…or drop an audio file here."),
  );
  const recordButton = el("button", { type: "button", id: "clone-record" }, "Record");
  const recordState = el("output", { id: "clone-rec-seconds", "aria-live": "polite" }, "0.0 s");
  const clipInfo = el("p", { id: "clone-clip", role: "status" }, "No clip chosen yet.");
  const preview = el("audio", { controls: true, id: "clone-preview", hidden: true });
  preview.setAttribute("aria-label", "The chosen clip");

  async function useClip(blob, filename, how) {
    const seconds = await clipSeconds(blob);
    clip = { blob, filename, seconds };
    if (preview.src) URL.revokeObjectURL(preview.src);
    const url = URL.createObjectURL(blob);
    urls.add(url);
    preview.src = url;
    preview.hidden = false;
    const length = seconds === null ? "length unknown" : `${seconds.toFixed(1)} s`;
    clipInfo.textContent = `Clip to clone: ${filename} (${how}, ${length}).`;
    clipInfo.dataset.seconds = seconds === null ? "" : seconds.toFixed(3);
    if (seconds !== null && (seconds < limits.min_seconds || seconds > limits.max_seconds)) {
      clipInfo.textContent += ` The server takes ${limits.min_seconds}–${limits.max_seconds} s.`;
    }
  }

  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (file) guarded(() => useClip(file, file.name, "uploaded"));
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = [...event.dataTransfer.files].find((f) => AUDIO_NAME.test(f.name)) ||
      event.dataTransfer.files[0];
    if (file) guarded(() => useClip(file, file.name, "dropped"));
  });

  function stopTicker() {
    clearInterval(ticker);
    ticker = null;
  }

  recordButton.addEventListener("click", () =>
    guarded(async () => {
      if (!recorder) {
        recorder = new Recorder();
        try {
          await recorder.start();
        } catch (err) {
          recorder = null;
          throw err;
        }
        recordButton.textContent = "Stop recording";
        recordButton.setAttribute("aria-pressed", "true");
        ticker = setInterval(() => {
          recordState.textContent = `${recorder.seconds.toFixed(1)} s`;
          if (recorder.seconds >= limits.max_seconds) recordButton.click();
        }, 100);
        return;
      }
      const take = recorder;
      recorder = null;
      stopTicker();
      recordButton.disabled = true;
      try {
        recordState.textContent = `${take.seconds.toFixed(1)} s`;
        const wav = await take.stop();
        await useClip(wav, "recording.wav", "recorded");
      } finally {
        recordButton.disabled = false;
        recordButton.textContent = "Record";
        recordButton.setAttribute("aria-pressed", "false");
      }
    }),
  );
  recordButton.setAttribute("aria-pressed", "false");

  // --- the voice's fields ------------------------------------------------------------------------
  const nameInput = el("input", {
    id: "clone-name",
    required: true,
    maxlength: 64,
    pattern: "[A-Za-z0-9][A-Za-z0-9_\\-]*",
    autocomplete: "off",
    spellcheck: "false",
  });
  const modelSelect = el(
    "select",
    { id: "clone-model" },
    models.map((name) => el("option", { value: name }, name)),
  );
  const languageInput = el("input", { id: "clone-language", placeholder: "e.g. english" });
  const transcriptInput = el("textarea", {
    id: "clone-transcript",
    maxlength: limits.max_text_chars,
    rows: 2,
  });
  const submit = el("button", { type: "submit", class: "primary", id: "clone-submit" }, "Clone");
  const status = el("p", { id: "clone-status", role: "status", "aria-live": "polite" });
  const result = el("section", { id: "clone-result", "aria-labelledby": "clone-result-h", hidden: true });

  const formNode = el(
    "form",
    { id: "clone-form", novalidate: true },
    el(
      "fieldset",
      {},
      el("legend", {}, "The clip"),
      drop,
      el(
        "div",
        { class: "row" },
        recordButton,
        el("span", {}, "Recorded: ", recordState),
      ),
      clipInfo,
      preview,
    ),
    el(
      "fieldset",
      {},
      el("legend", {}, "The voice"),
      el(
        "div",
        { class: "row" },
        field("Name", nameInput, "letters, digits, - and _"),
        field("Base model", modelSelect),
        field("Language (optional)", languageInput),
      ),
      field(
        "Transcript of the clip (optional)",
        transcriptInput,
        "With it the model clones in context; without, from the voice's timbre alone.",
      ),
    ),
    el("div", { class: "row" }, submit, status),
  );

  formNode.addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(async () => {
      if (!clip) throw new Error("Choose, drop or record a clip first.");
      if (!nameInput.value.trim()) throw new Error("Give the voice a name.");
      const body = new FormData();
      body.append("name", nameInput.value.trim());
      body.append("strategy", "clone");
      if (modelSelect.value) body.append("base_model", modelSelect.value);
      if (languageInput.value.trim()) body.append("language", languageInput.value.trim());
      if (transcriptInput.value.trim()) body.append("ref_text", transcriptInput.value.trim());
      body.append("ref", clip.blob, clip.filename);
      submit.disabled = true;
      status.textContent = "Cloning…";
      try {
        const response = await request("POST", "/voices", { form: body, signal: controller.signal });
        showVoice(await response.json());
        status.textContent = "Done.";
      } catch (err) {
        status.textContent = "Not cloned.";
        throw err;
      } finally {
        submit.disabled = false;
      }
    });
  });

  // --- the new voice, speaking ---------------------------------------------------------------
  function showVoice(voice) {
    const sentence = el("textarea", { id: "clone-sentence", rows: 2 }, SENTENCE);
    const samples = el("output", { id: "clone-samples", "aria-live": "polite" }, "0");
    const speakStatus = el("span", { id: "clone-speak-status", role: "status" });
    const speak = el("button", { type: "button", class: "primary", id: "clone-speak" }, "Speak");
    speak.addEventListener("click", () =>
      guarded(async () => {
        speak.disabled = true;
        speakStatus.textContent = "Speaking…";
        try {
          await player?.close();
          player = new StreamPlayer();
          await player.resume();
          const response = await request("POST", "/speak", {
            json: { speaker: voice.name, text: sentence.value, format: "pcm", stream: true },
            signal: controller.signal,
          });
          const decoder = new Pcm16Decoder();
          const reader = response.body.getReader();
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            player.push(decoder.decode(value));
            samples.textContent = String(player.samples);
          }
          speakStatus.textContent = `Spoke ${(player.samples / SAMPLE_RATE).toFixed(2)} s.`;
        } catch (err) {
          speakStatus.textContent = "";
          throw err;
        } finally {
          speak.disabled = false;
        }
      }),
    );
    const meta = voice.meta || {};
    const modes = { icl: "in context, with the transcript", x_vector: "from the speaker's timbre" };
    const how = meta.clone ? ` (${modes[meta.clone] || meta.clone})` : "";
    result.replaceChildren(
      el("h3", { id: "clone-result-h" }, "Voice ready: ", el("span", { id: "clone-voice" }, voice.name)),
      el(
        "p",
        {},
        `A ${voice.kind} voice on ${voice.base_model}${how}. `,
        el("a", { href: `#/playground?voice=${encodeURIComponent(voice.name)}`, id: "clone-playground" }, "Use it in the playground"),
      ),
      field("Sentence", sentence),
      el("div", { class: "row" }, speak, el("span", {}, "Samples played: ", samples), speakStatus),
    );
    result.hidden = false;
    result.scrollIntoView?.({ block: "nearest" });
  }

  view.append(
    el("h2", {}, "Clone a voice"),
    el(
      "p",
      { class: "hint" },
      "One clip of a speaker becomes a voice straight away, no training. ",
      "To train on several clips, use ",
      el("a", { href: "#/finetune" }, "Fine-tune"),
      ".",
    ),
    formNode,
    result,
  );
  if (params?.get("name")) nameInput.value = params.get("name");
  if (form && !models.length) {
    showProblem(new Error("No speech model that can clone is loaded on this server."));
  }

  return () => {
    controller.abort();
    stopTicker();
    recorder?.release();
    player?.close();
    for (const url of urls) URL.revokeObjectURL(url);
  };
}
