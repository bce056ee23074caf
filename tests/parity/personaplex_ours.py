"""Our side of the PersonaPlex / Mimi parity test: run with the project's interpreter (.venv).

    python tests/parity/personaplex_ours.py CHECKPOINT INPUTS.npz OUT.npz

Loads CHECKPOINT the way the server does (`server.duplex.engine.DuplexModel.load`: our loader,
the LoRA bank installed on the targeted linears, the streaming runtime) and writes, for the
undelayed tokens `codes` [1, 17, T] of INPUTS:

- serve_text [T, text_card], serve_audio [8, T, card]: the server's step
  (`PersonaPlexRuntime._model_step`, one 80 ms step per call over the session's KV caches), fed
  step s the delayed tokens of step s - 1 and teacher-forced with every token of step s, as
  Moshi's training forward is. Its logits are recorded as they reach `sample_top_k`, which still
  samples as usual; only the agent's 8 depformer slices run there, as in serving;
- train_text [S, text_card], train_audio [16, S, card]: the training forward
  (`forward.teacher_forced`, all at once, causal mask), every depformer slice;

both in delayed time (step s of stream k holds the token of frame s - delay_k). And for the
24 kHz mono `pcm` / the codes `decode_codes` [8, F] of INPUTS, with the Mimi our loader built:
stream_codes / batch_codes [8, F] (serving's `MimiStreamer`, one 1920-sample frame a call;
training's batch `mimi_encoder`) and stream_pcm / batch_pcm (decoded `decode_codes`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)
import finetune.families.personaplex.runtime as runtime_module
from finetune.families.personaplex.forward import StreamLayout, delay_streams, teacher_forced
from finetune.families.personaplex.layout import FRAME_SIZE
from finetune.families.personaplex.streams import PreparedStep
from finetune.families.personaplex.training import mimi_encoder

import mlx.core as mx
import numpy as np

from server.duplex.engine import DuplexModel


def main(checkpoint: Path, inputs: Path, out: Path) -> None:
    data = np.load(inputs)
    codes = np.asarray(data["codes"], np.int32)
    model = DuplexModel.load("parity", str(checkpoint), slots=2, max_rank=8, max_bytes=1 << 26)
    runtime, lm = model.runtime, model.loaded.lm
    results: dict[str, np.ndarray] = {}
    results["serve_text"], results["serve_audio"] = _serving_logits(runtime, codes)

    forward = teacher_forced(lm, codes)
    mx.eval(forward.text_logits, forward.audio_logits)
    results["train_text"] = np.array(forward.text_logits[0], np.float32)
    results["train_audio"] = np.array(forward.audio_logits[0], np.float32)

    mimi = model.loaded.mimi
    pcm = np.asarray(data["pcm"], np.float32)
    encoder = runtime.mimi.new_encoder()
    frames = [
        np.array(runtime.mimi.encode(encoder, mx.array(pcm[i : i + FRAME_SIZE])))[0, :, 0]
        for i in range(0, len(pcm), FRAME_SIZE)
    ]
    results["stream_codes"] = np.stack(frames, axis=1)
    results["batch_codes"] = mimi_encoder(mimi)(pcm).T
    decode_codes = np.asarray(data["decode_codes"], np.int32)
    decoder = runtime.mimi.new_decoder()
    pieces = [
        np.array(runtime.mimi.decode(decoder, mx.array(decode_codes[:, f : f + 1])))
        for f in range(decode_codes.shape[1])
    ]
    results["stream_pcm"] = np.concatenate(pieces).astype(np.float32)
    results["batch_pcm"] = np.array(mimi.decode(mx.array(decode_codes)[None]), np.float32)[0, 0]
    np.savez(out, **results)


def _serving_logits(runtime: object, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the server's step over the delayed tokens of `codes`, teacher-forced."""
    lm = runtime.lm  # type: ignore[attr-defined]
    sequence = delay_streams(codes, StreamLayout.from_lm(lm))
    recorded: list[np.ndarray] = []
    sample = runtime_module.sample_top_k

    def recording(logits: mx.array, *args: mx.array) -> mx.array:
        recorded.append(np.array(logits, np.float32))
        return sample(logits, *args)

    runtime_module.sample_top_k = recording  # type: ignore[assignment]
    session = runtime.new_session(seed=0)  # type: ignore[attr-defined]
    text, audio = [], []
    try:
        for s in range(codes.shape[2]):
            step = PreparedStep(
                inputs=sequence.inputs[0, :, s].astype(np.int64),
                target=sequence.targets[0, :, s].astype(np.int64),
                forced=np.ones(sequence.inputs.shape[1], bool),
                input_position=0,
                target_position=0,
            )
            recorded.clear()
            runtime._model_step([session], [step])  # type: ignore[attr-defined]
            text.append(recorded[0][0])  # the first call samples the text token
            audio.append(np.stack([r[0] for r in recorded[1:]]))  # then each agent slice
    finally:
        runtime_module.sample_top_k = sample
    return np.stack(text), np.stack(audio, axis=1)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
