// Conversation: talk full-duplex with a PersonaPlex voice over the `/duplex` WebSocket.
//
// The socket speaks the Moshi / PersonaPlex binary framing (server/duplex/protocol.py): the
// first byte of every message is its kind. 0x00 handshake, 0x01 audio, 0x02 text, 0x03
// control (0 start, 1 end turn, 2 pause, 3 restart), 0x04 metadata (JSON), 0x05 error (words),
// 0x06 ping. With encoding=pcm16 the audio both ways is little-endian 16-bit mono at 24 kHz;
// the server steps the model once per 1920-sample (80 ms) frame it reads, and answers each step
// with one audio frame (and a text message when the step's token carries text). A refusal is a
// 0x05 error with the whole reason, then a close with a 44xx code.
//
// The microphone goes through an AudioWorklet (/console/mic-worklet.js) that resamples it to
// 24 kHz; this page cuts it into frames, sends them while the session is live, and plays the
// model's frames back to back (audio.js StreamPlayer).
import { ApiError, getJSON, socketURL } from "../api.js";
import { Pcm16Decoder, SAMPLE_RATE, StreamPlayer } from "../audio.js";
import { el, field, guarded, showProblem } from "../ui.js";

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6 };
const CONTROL = { START: 0, END_TURN: 1, PAUSE: 2, RESTART: 3 };
const FRAME_SAMPLES = 1920; // one model step: 80 ms at 24 kHz (the metadata message confirms it)
const LATENCY_WINDOW = 25; // steps the shown round trip is the median of
const MAX_BUFFERED_BYTES = 2 * SAMPLE_RATE * 2; // 2 s of PCM16 waiting in the socket: drop frames

// HTTP statuses the 44xx close codes mirror, so ApiError's words (e.g. "needs an API key") apply.
const CLOSE_STATUS = { 4401: 401, 4403: 403, 4404: 404, 4413: 413, 4422: 422, 4429: 429 };

/** A duplex session the server closed or refused, in words. */
export class ConversationClosed extends ApiError {
  constructor(code, reason) {
    super(CLOSE_STATUS[code] || 0, { detail: reason || "no reason given" });
    this.name = "ConversationClosed";
    this.code = code;
  }

  get words() {
    const why = this.message;
    const code = ` (close code ${this.code})`;
    switch (this.code) {
      case 4401:
      case 4403:
        return `${super.words}${code}`;
      case 4404:
        return `The conversation could not start: ${why}${code}`;
      case 4422:
        return `The server refused the conversation's settings: ${why}${code}`;
      case 4429:
        return `Too many conversations or requests right now: ${why}${code}`;
      case 4413:
        return `The server closed the conversation because the page stopped reading: ${why}${code}`;
      case 1008:
        return `The server could not read what the page sent: ${why}${code}`;
      case 1011:
        return `The conversation failed on the server: ${why}${code}`;
      case 1013:
        return `The server ended the conversation: ${why}; try again later${code}`;
      case 1006:
        return `The connection to the server was lost${code}`;
      default:
        return `The conversation ended: ${why}${code}`;
    }
  }
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** One conversation: microphone -> socket -> player. `ui` holds the page's elements. */
class Session {
  constructor(ui, { voice, prompt, seed }) {
    this.ui = ui;
    this.voice = voice;
    this.prompt = prompt;
    this.seed = seed;
    this.state = "connecting";
    this.frameSamples = FRAME_SAMPLES;
    this.frame = new Float32Array(this.frameSamples);
    this.filled = 0;
    this.sent = []; // per sent frame, oldest first: { t, epoch, timed }
    this.epoch = 0; // bumped by each restart
    this.latencies = [];
    this.framesSent = 0;
    this.framesDropped = 0;
    this.textCount = 0;
    this.lastError = null;
    this.closedByUs = false;
    this.ended = false;
    this.decoder = new Pcm16Decoder();
    this.textDecoder = new TextDecoder();
    // Made in the click's own turn, so the browser lets both contexts start.
    this.player = new StreamPlayer(SAMPLE_RATE);
    this.micContext = new AudioContext();
  }

  async start() {
    this.setState("connecting", "Starting the microphone…");
    await this.player.resume();
    if (this.micContext.state === "suspended") await this.micContext.resume();
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
    if (this.ended) return this.releaseMedia();
    await this.micContext.audioWorklet.addModule("/console/mic-worklet.js");
    if (this.ended) return this.releaseMedia();
    this.source = this.micContext.createMediaStreamSource(this.stream);
    this.capture = new AudioWorkletNode(this.micContext, "mic-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { targetRate: SAMPLE_RATE, chunkMs: 20 },
    });
    // A silent path to the destination keeps the worklet pulled in every browser.
    this.mute = this.micContext.createGain();
    this.mute.gain.value = 0;
    this.source.connect(this.capture).connect(this.mute).connect(this.micContext.destination);
    this.capture.port.onmessage = (event) => this.onMicrophone(event.data);

    const url = new URL(
      socketURL("/duplex", { encoding: "pcm16", speaker: this.voice, seed: this.seed }),
    );
    url.searchParams.set("text_prompt", this.prompt); // "" is meaningful: no system prompt
    this.setState("connecting", "Connecting… the model reads the voice and text prompts first.");
    this.socket = new WebSocket(url.toString());
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => this.onMessage(event.data);
    this.socket.onclose = (event) => this.onClose(event);
    return undefined;
  }

  setState(state, words) {
    this.state = state;
    this.ui.status.dataset.state = state;
    if (words) this.ui.status.textContent = words;
    this.ui.sync();
  }

  // --- microphone -> socket ----------------------------------------------------------------
  onMicrophone(chunk) {
    if (this.state !== "live" && this.state !== "restarting") {
      this.filled = 0; // nothing is sent before the handshake or while paused
      return;
    }
    let at = 0;
    while (at < chunk.length) {
      const take = Math.min(chunk.length - at, this.frameSamples - this.filled);
      this.frame.set(chunk.subarray(at, at + take), this.filled);
      this.filled += take;
      at += take;
      if (this.filled === this.frameSamples) {
        this.sendFrame(this.frame);
        this.filled = 0;
      }
    }
  }

  sendFrame(samples) {
    const socket = this.socket;
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    if (socket.bufferedAmount > MAX_BUFFERED_BYTES) {
      this.framesDropped += 1; // the network is behind: better a gap than an ever-growing delay
      return;
    }
    const message = new Uint8Array(1 + 2 * samples.length);
    message[0] = KIND.AUDIO;
    const view = new DataView(message.buffer, 1);
    for (let i = 0; i < samples.length; i += 1) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      view.setInt16(2 * i, Math.round(s * 32767), true);
    }
    socket.send(message);
    this.sent.push({ t: performance.now(), epoch: this.epoch, timed: true });
    this.framesSent += 1;
    this.ui.sent.textContent = String(this.framesSent);
  }

  control(code) {
    if (this.socket?.readyState === WebSocket.OPEN) {
      this.socket.send(new Uint8Array([KIND.CONTROL, code]));
    }
  }

  // --- socket -> page ----------------------------------------------------------------------
  onMessage(data) {
    if (this.ended || !(data instanceof ArrayBuffer) || data.byteLength === 0) return;
    const bytes = new Uint8Array(data);
    const payload = bytes.subarray(1);
    switch (bytes[0]) {
      case KIND.HANDSHAKE:
        this.onHandshake();
        break;
      case KIND.AUDIO:
        this.onAudio(payload);
        break;
      case KIND.TEXT:
        this.onText(this.textDecoder.decode(payload));
        break;
      case KIND.METADATA:
        this.onMetadata(JSON.parse(this.textDecoder.decode(payload)));
        break;
      case KIND.ERROR:
        this.lastError = this.textDecoder.decode(payload);
        showProblem(new Error(`The server says: ${this.lastError}`));
        break;
      default:
        break; // 0x03 / 0x06 are not sent to this page
    }
  }

  onHandshake() {
    if (this.state === "restarting") {
      // Frames sent before the restart were dropped with the old conversation's state.
      this.sent = this.sent.filter((entry) => entry.epoch === this.epoch);
      this.setState("live", "Restarted: the conversation begins again. Speak.");
      return;
    }
    this.setState("live", "Live: speak, the model answers as it listens.");
  }

  onMetadata(info) {
    if (info.frame_samples && info.frame_samples !== this.frameSamples) {
      this.frameSamples = info.frame_samples;
      this.frame = new Float32Array(this.frameSamples);
      this.filled = 0;
    }
    if (info.sample_rate && info.sample_rate !== SAMPLE_RATE) {
      const words = `The server sends ${info.sample_rate} Hz audio; the page plays 24 kHz.`;
      showProblem(new Error(words));
    }
    this.ui.session.textContent = `Session ${info.session_id}: ${info.speaker} on ${info.model}`;
  }

  onAudio(payload) {
    const samples = this.decoder.decode(payload);
    this.player.push(samples);
    this.ui.samples.textContent = String(this.player.samples);
    this.ui.seconds.textContent = `(${(this.player.samples / SAMPLE_RATE).toFixed(1)} s)`;
    const entry = this.sent.shift(); // the server answers each frame it steps, in order
    if (entry && entry.timed) {
      this.latencies.push(performance.now() - entry.t);
      if (this.latencies.length > LATENCY_WINDOW) this.latencies.shift();
      this.ui.latency.textContent = `${Math.round(median(this.latencies))} ms`;
    }
  }

  onText(text) {
    this.textCount += 1;
    this.ui.text.append(text);
    this.ui.textCount.textContent = String(this.textCount);
  }

  onClose(event) {
    const ours = this.closedByUs;
    this.end();
    this.ui.onEnded(this);
    if (ours || (event.code === 1000 && !this.lastError)) {
      const words = ours ? "Hung up: the connection is closed." : "The server ended the conversation.";
      this.setState("closed", words);
      return;
    }
    this.setState("closed", `Closed (code ${event.code}).`);
    const reason = this.lastError || event.reason;
    showProblem(new ConversationClosed(event.code, reason));
  }

  // --- controls ----------------------------------------------------------------------------
  pause() {
    if (this.state !== "live") return;
    this.control(CONTROL.PAUSE);
    for (const entry of this.sent) entry.timed = false; // they wait out the pause: not a latency
    this.setState("paused", "Paused: the model waits; the microphone is not sent.");
  }

  resume() {
    if (this.state !== "paused") return;
    this.control(CONTROL.START);
    this.setState("live", "Live again: speak.");
  }

  restart() {
    if (this.state !== "live" && this.state !== "paused") return;
    if (this.state === "paused") this.control(CONTROL.START);
    this.epoch += 1;
    this.control(CONTROL.RESTART);
    this.player.stop();
    this.ui.text.append("\n\n");
    this.setState("restarting", "Restarting: the model reads its prompts again…");
  }

  hangUp() {
    this.closedByUs = true;
    const socket = this.socket;
    if (socket?.readyState === WebSocket.CONNECTING) {
      // Closing a socket still connecting is logged as an error by browsers: close it once open.
      socket.onopen = () => socket.close(1000, "hung up");
    } else if (socket?.readyState === WebSocket.OPEN) {
      socket.close(1000, "hung up");
    } else {
      this.end();
      this.setState("closed", "Hung up.");
      this.ui.onEnded(this);
    }
    this.end();
  }

  /** Stop the microphone and the playback; idempotent. */
  end() {
    if (this.ended) return;
    this.ended = true;
    this.releaseMedia();
    this.player.close().catch(() => {});
  }

  releaseMedia() {
    if (this.capture) {
      this.capture.port.onmessage = null;
      this.capture.port.postMessage("stop");
      this.capture.disconnect();
    }
    this.source?.disconnect();
    for (const track of this.stream?.getTracks() || []) track.stop();
    if (this.micContext.state !== "closed") this.micContext.close().catch(() => {});
    return undefined;
  }
}

export async function render(view, { params }) {
  let session = null;
  let voices = [];
  let promptEdited = false;

  const voiceSelect = el("select", { id: "conv-voice", name: "voice" });
  const prompt = el("textarea", { id: "conv-prompt", name: "text_prompt", rows: "3" });
  const seed = el("input", {
    id: "conv-seed",
    name: "seed",
    type: "number",
    step: "1",
    inputmode: "numeric",
    placeholder: "random",
  });
  const talkButton = el("button", { type: "button", id: "conv-talk", class: "primary" }, "Talk");
  const pauseButton = el("button", { type: "button", id: "conv-pause" }, "Pause");
  const restartButton = el("button", { type: "button", id: "conv-restart" }, "Restart");
  const hangUpButton = el("button", { type: "button", id: "conv-hangup" }, "Hang up");
  const status = el("p", { id: "conv-status", role: "status", "aria-live": "polite" });
  status.dataset.state = "idle";

  const figure = (id, label, ...after) =>
    el(
      "div",
      {},
      el("span", { id: `${id}-label` }, label),
      " ",
      el("output", { id, "aria-labelledby": `${id}-label` }, "–"),
      ...after,
    );
  const seconds = el("span", { class: "hint" });
  const figures = el(
    "div",
    { class: "figures" },
    figure("conv-latency", "Reply round trip"),
    figure("conv-samples", "Model audio received (samples)", " ", seconds),
    figure("conv-text-count", "Text messages"),
    figure("conv-sent", "Microphone frames sent"),
  );
  const transcript = el("div", {
    id: "conv-text",
    class: "transcript",
    role: "log",
    "aria-live": "polite",
    "aria-labelledby": "conv-text-heading",
  });

  const ui = {
    status,
    session: el("p", { id: "conv-session", class: "hint" }),
    latency: figures.querySelector("#conv-latency"),
    samples: figures.querySelector("#conv-samples"),
    seconds,
    textCount: figures.querySelector("#conv-text-count"),
    sent: figures.querySelector("#conv-sent"),
    text: transcript,
    sync() {
      const state = session?.state || "idle";
      const open = session !== null && state !== "closed";
      talkButton.disabled = open || !voiceSelect.value;
      voiceSelect.disabled = open;
      prompt.disabled = open;
      seed.disabled = open;
      pauseButton.disabled = !(state === "live" || state === "paused");
      pauseButton.textContent = state === "paused" ? "Resume" : "Pause";
      restartButton.disabled = !(state === "live" || state === "paused");
      hangUpButton.disabled = !open;
    },
    onEnded(ended) {
      if (session === ended) session = null;
      this.sync();
    },
  };

  const voiceDefault = (name) => voices.find((v) => v.name === name)?.meta?.text_prompt || "";
  voiceSelect.addEventListener("change", () => {
    if (!promptEdited) prompt.value = voiceDefault(voiceSelect.value);
    ui.sync();
  });
  prompt.addEventListener("input", () => {
    promptEdited = true;
  });

  talkButton.addEventListener("click", () =>
    guarded(async () => {
      if (session) return;
      for (const name of ["samples", "textCount", "sent"]) ui[name].textContent = "0";
      ui.latency.textContent = "–";
      seconds.textContent = "";
      transcript.replaceChildren();
      ui.session.textContent = "";
      const seedText = seed.value.trim();
      const current = new Session(ui, {
        voice: voiceSelect.value,
        prompt: prompt.value,
        seed: seedText === "" ? undefined : seedText,
      });
      session = current;
      try {
        await current.start();
      } catch (err) {
        current.end();
        current.setState("closed", "Not started.");
        ui.onEnded(current);
        throw err;
      }
    }),
  );
  pauseButton.addEventListener("click", () => {
    if (session?.state === "paused") session.resume();
    else session?.pause();
  });
  restartButton.addEventListener("click", () => session?.restart());
  hangUpButton.addEventListener("click", () => session?.hangUp());

  view.append(
    el("h2", {}, "Conversation"),
    el(
      "p",
      { class: "hint" },
      "Talk with a full-duplex (PersonaPlex) voice: the microphone goes to the model while it " +
        "speaks; its voice plays back as it comes and its text appears below.",
    ),
    el(
      "div",
      { class: "row" },
      field("Duplex voice", voiceSelect, "Voices of the PersonaPlex models this server runs."),
      field("Seed", seed, "Empty: random. The same seed and input repeat a conversation."),
    ),
    field(
      "Text prompt",
      prompt,
      "PersonaPlex's system prompt (the model's role); the voice's own is filled in. Empty: none.",
    ),
    el("div", { class: "row" }, talkButton, pauseButton, restartButton, hangUpButton),
    status,
    ui.session,
    figures,
    el(
      "p",
      { class: "hint" },
      "Reply round trip: from sending an 80 ms microphone frame to receiving the model's " +
        `audio frame for that step (median of the last ${LATENCY_WINDOW}).`,
    ),
    el("h3", { id: "conv-text-heading" }, "The model's text"),
    transcript,
  );

  const list = await guarded(() => getJSON("/voices"));
  voices = (list?.voices || []).filter((v) => v.kind === "duplex" && v.available !== false);
  for (const voice of voices) {
    voiceSelect.append(el("option", { value: voice.name }, `${voice.name} (${voice.base_model})`));
  }
  const asked = params.get("voice");
  if (asked && !voices.some((v) => v.name === asked)) {
    voiceSelect.append(el("option", { value: asked }, `${asked} (not listed by the server)`));
  }
  const preferred = asked || (voices.some((v) => v.name === "demo-duplex") ? "demo-duplex" : "");
  if (preferred) voiceSelect.value = preferred;
  prompt.value = params.has("prompt") ? params.get("prompt") : voiceDefault(voiceSelect.value);
  if (params.has("seed")) seed.value = params.get("seed");
  if (list && !voices.length) {
    status.textContent = "This server runs no duplex (PersonaPlex) voice to talk with.";
  } else if (list) {
    status.textContent = "Pick a voice and press Talk; the browser asks for the microphone.";
  }
  ui.sync();

  return () => session?.hangUp();
}
