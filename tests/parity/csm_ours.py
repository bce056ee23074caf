"""Our side of the CSM parity test: run with the project's interpreter (.venv).

    python tests/parity/csm_ours.py CHECKPOINT OUT.npz

Loads CHECKPOINT with `load_csm` (what the server's CSM model loads) and builds the prompt the
server builds (`prompt_frames`: a context clip given as Mimi codes, then `[0]Hello there.`). Then
it runs the frame step the server runs (`SesameModel.generate_frame`, as `generate.iter_frames`
drives it) for FRAMES frames with greedy picks, recording every logits vector the step hands its
sampler: the backbone's codebook-0 logits, then the depth decoder's for codebooks 1..N-1.

OUT holds prompt_tokens / prompt_mask [L, N + 1], codes [FRAMES, N] (the picks) and
logits [FRAMES, N, audio_vocab].
"""

from __future__ import annotations

import sys
from pathlib import Path

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)
from finetune.families.csm.checkpoint import load_csm
from finetune.families.csm.conditioning import ContextClip, prompt_frames

import mlx.core as mx
import numpy as np

FRAMES = 3


def main(checkpoint: Path, out: Path) -> None:
    loaded = load_csm(checkpoint)
    n = loaded.num_codebooks
    rng = np.random.default_rng(5)
    context = ContextClip(text="Hi.", speaker=1, codes=rng.integers(1, 2048, (4, n)))
    prompt = prompt_frames(loaded, "Hello there.", 0, [context])
    recorded: list[np.ndarray] = []

    def greedy(logits: mx.array) -> mx.array:
        recorded.append(np.array(logits[0], np.float32))
        return mx.argmax(logits, axis=-1)

    sesame = loaded.backbone
    sesame.reset_caches()
    tokens = mx.array(prompt.tokens)[None]
    mask = mx.array(prompt.mask)[None]
    frame_mask = mx.array(np.arange(n + 1) < n)[None, None]
    position = mx.arange(len(prompt))[None]
    codes = []
    for _ in range(FRAMES):
        sample = sesame.generate_frame(tokens, mask, position, greedy)  # [1, N]
        codes.append(np.array(sample[0], np.int32))
        tokens = mx.concatenate([sample.astype(mx.int32), mx.zeros((1, 1), mx.int32)], axis=1)
        tokens, mask = tokens[:, None, :], frame_mask
        position = position[:, -1:] + 1
    np.savez(
        out,
        prompt_tokens=prompt.tokens,
        prompt_mask=prompt.mask,
        codes=np.stack(codes),
        logits=np.stack(recorded).reshape(FRAMES, n, -1),
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
