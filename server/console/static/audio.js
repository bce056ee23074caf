// Audio in the page: 16-bit PCM played as it arrives (Web Audio), waveforms, WAV files.

export const SAMPLE_RATE = 24000;

/** Little-endian 16-bit PCM bytes -> Float32 samples; keeps an odd trailing byte for later. */
export class Pcm16Decoder {
  constructor() {
    this.carry = null;
  }

  decode(bytes) {
    let data = bytes;
    if (this.carry) {
      data = new Uint8Array(this.carry.length + bytes.length);
      data.set(this.carry);
      data.set(bytes, this.carry.length);
      this.carry = null;
    }
    const whole = data.length - (data.length % 2);
    if (whole < data.length) this.carry = data.slice(whole);
    const view = new DataView(data.buffer, data.byteOffset, whole);
    const out = new Float32Array(whole / 2);
    for (let i = 0; i < out.length; i += 1) out[i] = view.getInt16(2 * i, true) / 32768;
    return out;
  }
}

/** Plays chunks of samples back to back as they come; counts what it was given. */
export class StreamPlayer {
  constructor(sampleRate = SAMPLE_RATE) {
    this.context = new AudioContext({ sampleRate });
    this.sampleRate = sampleRate;
    this.nextTime = 0;
    this.samples = 0;
    this.chunks = [];
    this.sources = new Set();
  }

  async resume() {
    if (this.context.state === "suspended") await this.context.resume();
  }

  push(samples) {
    if (!samples.length) return;
    this.samples += samples.length;
    this.chunks.push(samples);
    const buffer = this.context.createBuffer(1, samples.length, this.sampleRate);
    buffer.copyToChannel(samples, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const start = Math.max(this.nextTime, this.context.currentTime + 0.03);
    source.start(start);
    this.nextTime = start + buffer.duration;
    this.sources.add(source);
    source.onended = () => this.sources.delete(source);
  }

  /** Every sample pushed so far, joined. */
  joined() {
    return joinChunks(this.chunks);
  }

  stop() {
    for (const source of this.sources) {
      try {
        source.stop();
      } catch {
        // already ended
      }
    }
    this.sources.clear();
    this.nextTime = 0;
  }

  async close() {
    this.stop();
    if (this.context.state !== "closed") await this.context.close();
  }
}

export function joinChunks(chunks) {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const out = new Float32Array(total);
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

/** Min/max per pixel column of `samples` drawn on `canvas`. */
export function drawWaveform(canvas, samples) {
  const width = (canvas.width = canvas.clientWidth || 600);
  const height = (canvas.height = canvas.clientHeight || 120);
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  g.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--accent") || "#0b5cad";
  g.beginPath();
  const per = Math.max(1, Math.floor(samples.length / width));
  for (let x = 0; x < width; x += 1) {
    let lo = 0;
    let hi = 0;
    const from = x * per;
    for (let i = from; i < Math.min(from + per, samples.length); i += 1) {
      lo = Math.min(lo, samples[i]);
      hi = Math.max(hi, samples[i]);
    }
    g.moveTo(x + 0.5, ((1 - hi) * height) / 2);
    g.lineTo(x + 0.5, ((1 - lo) * height) / 2);
  }
  g.stroke();
}

/** Float32 samples -> a 16-bit mono WAV Blob. */
export function wavBlob(samples, sampleRate = SAMPLE_RATE) {
  const data = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (at, s) => [...s].forEach((c, i) => data.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF");
  data.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  data.setUint32(16, 16, true);
  data.setUint16(20, 1, true);
  data.setUint16(22, 1, true);
  data.setUint32(24, sampleRate, true);
  data.setUint32(28, sampleRate * 2, true);
  data.setUint16(32, 2, true);
  data.setUint16(34, 16, true);
  text(36, "data");
  data.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i += 1) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    data.setInt16(44 + i * 2, s < 0 ? s * 32768 : s * 32767, true);
  }
  return new Blob([data.buffer], { type: "audio/wav" });
}

// --- streamed speech (voices / playground pages) ---------------------------------------------
/** Reads a streamed 16-bit PCM response body chunk by chunk: each chunk is decoded and pushed
 *  into `player` as it arrives (playback starts with the first), then `onSamples(samples,
 *  total)` is called. Resolves with the number of samples decoded. */
export async function playPcmStream(response, player, onSamples = () => {}) {
  const decoder = new Pcm16Decoder();
  const reader = response.body.getReader();
  let total = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const samples = decoder.decode(value);
    if (!samples.length) continue;
    player.push(samples);
    total += samples.length;
    onSamples(samples, total);
  }
  return total;
}
