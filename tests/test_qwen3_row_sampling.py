"""A decode batch samples all its rows at once (finetune/families/qwen3_tts/row_sampling.py); each
row must still draw exactly what mlx-audio's own `_sample_token` draws for it alone, with the
global seed the row was given, draw after draw."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from finetune.families.qwen3_tts.row_sampling import categorical_rows, sample_rows
from finetune.sampling import Sampling

import mlx.core as mx
import numpy as np
from mlx_audio.tts.models.qwen3_tts.qwen3_tts import Model

VOCAB = 300
SUPPRESS = list(range(VOCAB - 40, VOCAB - 1))  # all but the last id of the top block, as served


@dataclass
class FakeRow:
    sampling: Sampling
    seed: int
    generated: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = mx.random.key(self.seed)

    def next_key(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


def _reference(logits: np.ndarray, row: FakeRow, *, first: bool) -> int:
    """mlx-audio's sampler for one row, on the global random state."""
    opts = row.sampling
    token = Model._sample_token(
        None,  # type: ignore[arg-type]  # it reads nothing of the model
        mx.array(logits)[None, None, :],
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        repetition_penalty=opts.repetition_penalty if first else 1.0,
        generated_tokens=list(row.generated) if first else None,
        suppress_tokens=SUPPRESS if first else None,
    )
    return int(np.array(token).reshape(-1)[0])


OPTIONS = [
    Sampling(),  # 0.9, top-k 50, top-p 1, penalty 1.05
    Sampling(temperature=0.7, top_k=1),
    Sampling(temperature=1.0, top_k=0, repetition_penalty=1.3),
    Sampling(temperature=0.0),
    Sampling(temperature=0.8, top_k=20, top_p=0.8, repetition_penalty=1.0),
]


def test_each_row_draws_what_mlx_audio_draws_for_it_alone() -> None:
    rng = np.random.default_rng(3)
    for trial in range(24):
        count = int(rng.integers(1, 7))
        rows = [
            FakeRow(OPTIONS[int(rng.integers(len(OPTIONS)))], seed=int(rng.integers(2**31)))
            for _ in range(count)
        ]
        draws = []
        for step in range(4):
            first = step % 2 == 0
            logits = (rng.standard_normal((count, VOCAB)) * rng.choice([0.5, 3.0, 20.0])).astype(
                np.float32
            )
            if trial % 4 == 1:
                logits[0, : VOCAB // 2] = -np.inf  # a row masked down to half its ids
            for row in rows:  # recent tokens of every length, repeats, ids past the vocabulary
                row.generated = rng.integers(0, VOCAB + 5, int(rng.integers(0, 90))).tolist()
            generated = [list(row.generated) for row in rows]
            suppress = mx.array(SUPPRESS, dtype=mx.int32) if first else None
            got = sample_rows(mx.array(logits), rows, suppress=suppress)
            assert got.shape == (count, 1)
            draws.append((logits, first, generated, np.array(got)[:, 0]))
        for r in range(count):  # each row alone, its draws in order on its own seed
            mx.random.seed(rows[r].seed)
            for logits, first, generated, got in draws:
                alone = FakeRow(rows[r].sampling, rows[r].seed, generated[r])
                assert _reference(logits[r], alone, first=first) == got[r], (trial, r)


def test_rows_with_one_option_set_are_sampled_by_one_set_of_ops() -> None:
    rows = [FakeRow(Sampling(), seed=i) for i in range(8)]
    logits = mx.random.normal((8, VOCAB))
    mx.eval(logits)
    dot = io.StringIO()
    mx.export_to_dot(dot, sample_rows(logits, rows))
    nodes = re.findall(r'label ="([A-Za-z]+)', dot.getvalue())
    assert nodes.count("CumSum") == 1 and nodes.count("ArgPartition") == 1
    assert nodes.count("RandomBits") == 16  # each row's key split and its uniform draw


def test_categorical_rows_matches_mlx_on_ties_infinite_and_nan_rows() -> None:
    logits = mx.array(
        [
            [0.0, 0.0, 0.0, 0.0],
            [-np.inf, 2.0, 2.0, -np.inf],
            [np.inf, 1.0, np.inf, 0.0],
            [5.0, -np.inf, -np.inf, -np.inf],
            [0.0, np.nan, 1.0, 0.5],  # a NaN poisons the row: MLX gives its last id
            [np.nan, np.nan, np.nan, np.nan],
        ],
        dtype=mx.float32,
    )
    for seed in range(40):
        keys = [mx.random.key(seed * 8 + i) for i in range(6)]
        alone = [mx.random.categorical(logits[i : i + 1], key=keys[i]).item() for i in range(6)]
        assert np.array(categorical_rows(logits, keys)).tolist() == alone
