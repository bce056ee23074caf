"""CSM rows of a batch in one forward per frame: each row equals the same request alone.

"Alone" is the family's own path, `generate.iter_frames` over mlx-audio's
`SesameModel.generate_frame` (one utterance, the model's own caches) and Mimi's streaming
decoder, with the row's adapter the only bank row. Codes and samples must be bit-identical:
on the tiny model every GEMM of a decode step gives a row what it gives alone (see
finetune/families/csm/batch.py for where that holds).
"""

from __future__ import annotations

import threading
from pathlib import Path

from finetune.families.csm.batch import CsmBatchGenerator
from finetune.families.csm.generate import (
    ContextClip,
    FrameSampler,
    generate_codes,
    prompt_frames,
    synthesize,
)
from finetune.sampling import Sampling

import numpy as np
import pytest

from server.engine.bank import AdapterTensors
from server.engine.families.csm import CsmModel, CsmRow

RANK = 4


def _adapter(model: CsmModel, name: str, seed: int) -> AdapterTensors:
    """A rank-4 adapter with random non-zero A and B on every banked backbone/decoder layer."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for path, layer in model.bank.layers.items():
        in_dims, out_dims = layer.lora_a.shape[1], layer.lora_b.shape[2]
        tensors[f"{path}.lora_a"] = rng.normal(0, 0.3, (in_dims, RANK)).astype(np.float32)
        tensors[f"{path}.lora_b"] = rng.normal(0, 0.3, (RANK, out_dims)).astype(np.float32)
    nbytes = sum(a.nbytes for a in tensors.values())
    return AdapterTensors(Path(name), 2.0, RANK, tensors, nbytes)


@pytest.fixture(scope="module")
def served(tiny_csm: Path) -> tuple[CsmModel, list[int]]:
    """The served tiny CSM (its own copy: the bank re-wraps its layers) and two adapter slots."""
    model = CsmModel.load("csm-tiny", str(tiny_csm), slots=4, max_rank=8, max_bytes=1 << 26)
    slots = [model.bank.ensure(_adapter(model, f"adapter{s}", s)) for s in (1, 2)]
    return model, slots


# (text, speaker, seed, temperature, top_k, frames): prompts of different lengths, greedy and
# seeded top-k, rows ending at different steps.
REQUESTS = [
    ("Hello there.", 0, 3, 0.9, 50, 4),
    ("A much longer sentence, so this prompt has more rows.", 1, 4, 0.0, 0, 5),
    ("Hi.", 0, 5, 0.7, 10, 2),
    ("Good morning to you all.", 1, 6, 1.0, 0, 4),
]


def _alone(model: CsmModel, request: tuple, slot: int = 0, context=()) -> np.ndarray:
    text, speaker, seed, temperature, top_k, frames = request
    model.bank.set_rows([slot])
    try:
        return generate_codes(
            model.loaded,
            text,
            speaker=speaker,
            context=context,
            seed=seed,
            max_audio_frames=frames,
            temperature=temperature,
            top_k=top_k,
        )
    finally:
        model.bank.set_rows(None)


def _row(model: CsmModel, request: tuple, slot: int = 0, context=()) -> CsmRow:
    text, speaker, seed, temperature, top_k, frames = request
    return CsmRow(
        prompt=prompt_frames(model.loaded, text, speaker, context),
        sampling=Sampling(temperature=temperature, top_k=top_k, max_tokens=frames),
        seed=seed,
        slot=slot,
        cancel=threading.Event(),
    )


def test_batched_rows_equal_each_row_alone(served) -> None:
    model, _ = served
    context = [ContextClip(text="Earlier words.", speaker=0, codes=np.arange(24).reshape(3, 8))]
    contexts = [(), (), context, ()]  # one prompt holds a context segment (text + audio)
    rows = [_row(model, r, context=c) for r, c in zip(REQUESTS, contexts, strict=True)]
    model.run(rows)
    for request, row, ctx in zip(REQUESTS, rows, contexts, strict=True):
        expected = _alone(model, request, context=ctx)
        assert expected.shape == (request[-1], 8)  # a random tiny model never says EOS
        np.testing.assert_array_equal(np.stack(row.frames), expected, err_msg=request[0])
        text, speaker, seed, temperature, top_k, frames = request
        audio = synthesize(
            model.loaded,
            text,
            speaker=speaker,
            context=ctx,
            seed=seed,
            max_audio_frames=frames,
            temperature=temperature,
            top_k=top_k,
        )
        np.testing.assert_array_equal(
            model.decode_frames([(row, 0, len(row.frames))])[0], audio, err_msg=request[0]
        )


def test_different_adapters_in_one_batch_each_equal_alone(served) -> None:
    model, (first, second) = served
    slots = [first, 0, second, first]
    rows = [_row(model, r, slot) for r, slot in zip(REQUESTS, slots, strict=True)]
    model.run(rows)
    for request, row, slot in zip(REQUESTS, rows, slots, strict=True):
        expected = _alone(model, request, slot)
        np.testing.assert_array_equal(np.stack(row.frames), expected, err_msg=str(slot))
    # The adapters are really in the forward: the base model says something else.
    assert not np.array_equal(np.stack(rows[0].frames), _alone(model, REQUESTS[0], 0))
    assert not np.array_equal(np.stack(rows[2].frames), _alone(model, REQUESTS[2], 0))


def test_a_row_joining_a_running_batch_equals_it_alone(served) -> None:
    model, (first, _) = served
    generator = CsmBatchGenerator(model.loaded, model.bank.set_rows)

    def start(request: tuple, slot: int):
        text, speaker, seed, temperature, top_k, frames = request
        prompt = prompt_frames(model.loaded, text, speaker)
        sampler = FrameSampler(seed, temperature, top_k)
        return generator.start(prompt, sampler, max_frames=frames, slot=slot)

    made: dict[int, list[np.ndarray]] = {i: [] for i in range(3)}
    streams = {0: start(REQUESTS[1], first), 1: start(REQUESTS[3], 0)}
    try:
        for step in range(8):
            if step == 2:  # joins after the others made two frames
                streams[2] = start(REQUESTS[0], first)
            live = [i for i in sorted(streams) if not streams[i].done]
            if not live:
                break
            codes = generator.step([streams[i] for i in live])
            for i, frame in zip(live, codes, strict=True):
                made[i].append(frame)
    finally:
        generator.release()
    for i, (request, slot) in enumerate([(REQUESTS[1], first), (REQUESTS[3], 0)]):
        np.testing.assert_array_equal(np.stack(made[i]), _alone(model, request, slot))
    np.testing.assert_array_equal(np.stack(made[2]), _alone(model, REQUESTS[0], first))


def test_a_cancelled_row_leaves_and_the_others_go_on(served) -> None:
    model, (first, _) = served
    rows = [_row(model, r, slot) for r, slot in zip(REQUESTS[:3], [first, 0, 0], strict=True)]

    def cancel_after_two(_: np.ndarray) -> None:
        if len(rows[1].frames) == 2:
            rows[1].cancel.set()

    rows[1].on_frames = cancel_after_two  # row 1 could make 5 frames
    model.run(rows)
    assert len(rows[1].frames) == 2
    assert model.bank.ctx.slot_ids is None  # the batch leaves no adapter rows behind
    for request, row, slot in zip(REQUESTS[:3], rows, [first, 0, 0], strict=True):
        expected = _alone(model, request, slot)
        np.testing.assert_array_equal(np.stack(row.frames), expected[: len(row.frames)])
    assert [len(r.frames) for r in rows] == [4, 2, 2]
