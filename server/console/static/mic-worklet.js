// The microphone's AudioWorklet processor: mono, resampled from the audio context's rate to
// `targetRate` (24 kHz for the duplex socket), posted to the page as Float32Array chunks of
// about `chunkMs` milliseconds. Loaded by pages/conversation.js with
// audioWorklet.addModule("/console/mic-worklet.js").
//
// Resampling: linear interpolation between input samples, after a short
// moving-average low-pass when downsampling (48 kHz -> 24 kHz averages 2 samples), which keeps
// the worst aliasing out of speech without a heavy filter. The read position carries over from
// one 128-sample render quantum to the next, so chunks join without clicks.

class MicCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || 24000;
    this.step = sampleRate / this.targetRate; // input samples per output sample
    this.taps = Math.max(1, Math.round(this.step)); // moving-average length when downsampling
    this.history = new Float32Array(this.taps); // the last input samples (for the average)
    this.prev = 0; // the filtered sample before this quantum's first one
    this.pos = 0; // read position, in input samples, relative to this quantum's start
    this.chunk = Math.round((this.targetRate * (opts.chunkMs || 20)) / 1000);
    this.out = new Float32Array(this.chunk);
    this.filled = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "stop") this.running = false;
    };
  }

  filtered(channel) {
    // Moving average over `taps` samples (identity when taps == 1).
    const n = channel.length;
    const out = new Float32Array(n);
    const taps = this.taps;
    if (taps === 1) {
      out.set(channel);
      return out;
    }
    let sum = 0;
    for (let i = 0; i < taps; i += 1) sum += this.history[i];
    let h = 0;
    for (let i = 0; i < n; i += 1) {
      sum += channel[i] - this.history[h];
      this.history[h] = channel[i];
      h = (h + 1) % taps;
      out[i] = sum / taps;
    }
    // keep history ordered oldest-first for the next quantum
    const ordered = new Float32Array(taps);
    for (let i = 0; i < taps; i += 1) ordered[i] = this.history[(h + i) % taps];
    this.history = ordered;
    return out;
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true;
    // Mix the channels down to mono.
    const n = input[0].length;
    const mono = new Float32Array(n);
    for (const channel of input) for (let i = 0; i < n; i += 1) mono[i] += channel[i];
    if (input.length > 1) for (let i = 0; i < n; i += 1) mono[i] /= input.length;
    const x = this.filtered(mono);
    // Interpolate between x[i-1] and x[i]; index -1 is the previous quantum's last sample.
    while (this.pos < n - 1) {
      const i = Math.floor(this.pos);
      const frac = this.pos - i;
      const a = i < 0 ? this.prev : x[i];
      const b = x[i + 1];
      this.out[this.filled] = a + (b - a) * frac;
      this.filled += 1;
      if (this.filled === this.chunk) {
        this.port.postMessage(this.out, [this.out.buffer]); // transferred: a fresh one follows
        this.out = new Float32Array(this.chunk);
        this.filled = 0;
      }
      this.pos += this.step;
    }
    this.prev = x[n - 1];
    this.pos -= n;
    return true;
  }
}

registerProcessor("mic-capture", MicCapture);
