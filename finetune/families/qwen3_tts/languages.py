"""Language ids for languages the checkpoint does not know (Hindi, Tamil, ... on Qwen3-TTS).

A new language gets a free `codec_embedding` row and a `codec_language_id[name]` entry, so the
shared conditioning (conditioning.py) lays it out as `[think, think_bos, LANG, think_eos]`, the
same as a built-in language. In training, the row's vector is a trainable `LanguageRows` module
on the talker (the big embedding table stays frozen); `forward.input_embeddings` puts it in
place of the table row. A trained voice carries the vectors (`language_rows.weight` in its
adapter) and the serving model writes them into its table when the voice is installed.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

from finetune.families.qwen3_tts.conditioning import normalise_language

import mlx.core as mx
import mlx.nn as nn
import numpy as np

WEIGHT_KEY = "language_rows.weight"  # the tensor's name in adapters.safetensors
FIRST_SPEAKER_ROW = 2048  # rows below are audio codes


class LanguageRows(nn.Module):
    """Trainable vectors for new language rows; row i of `weight` is codec row `rows[i]`."""

    def __init__(self, names: list[str], rows: list[int], init: mx.array) -> None:
        super().__init__()
        self._names = list(names)
        self._rows = list(rows)
        self.weight = init

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def rows(self) -> list[int]:
        return list(self._rows)

    def entries(self) -> list[dict[str, Any]]:
        return [{"name": n, "row": r} for n, r in zip(self._names, self._rows, strict=True)]

    def overlay(self, codec_ids: mx.array, codec: mx.array) -> mx.array:
        """`codec` ([B, L, H] table lookups of `codec_ids`) with the new rows swapped in."""
        for i, row in enumerate(self._rows):
            hit = (codec_ids == row)[..., None]
            codec = mx.where(hit, self.weight[i].astype(codec.dtype), codec)
        return codec


def row_of(value: Any) -> int:
    """The codec row an `spk_id` entry names (an int, or a list holding it)."""
    return int(value[0] if isinstance(value, list | tuple) else value)


def special_rows(talker_config: Any) -> set[int]:
    """codec_embedding rows of the special codec tokens."""
    c = talker_config
    return {
        c.codec_pad_id,
        c.codec_bos_id,
        c.codec_eos_token_id,
        c.codec_think_id,
        c.codec_nothink_id,
        c.codec_think_bos_id,
        c.codec_think_eos_id,
    }


def occupied_rows(talker_config: Any) -> set[int]:
    """Rows that already mean something: special tokens, languages, speakers."""
    c = talker_config
    taken = special_rows(c) | {int(v) for v in (c.codec_language_id or {}).values()}
    return taken | {row_of(v) for v in (c.spk_id or {}).values()}


def free_rows(
    talker_config: Any, count: int, *, also_taken: AbstractSet[int] = frozenset()
) -> list[int]:
    """`count` free rows, from just above the highest language id (the languages' own region)."""
    taken = occupied_rows(talker_config) | set(also_taken)
    languages = [int(v) for v in (talker_config.codec_language_id or {}).values()]
    start = max(languages) + 1 if languages else FIRST_SPEAKER_ROW
    order = [*range(start, talker_config.vocab_size), *range(FIRST_SPEAKER_ROW, start)]
    rows = [r for r in order if r not in taken][:count]
    if len(rows) < count:
        raise ValueError(f"no free codec_embedding row left for {count} new language(s)")
    return rows


def new_languages(talker_config: Any, languages: list[str | None]) -> list[str]:
    known = {k.lower() for k in (talker_config.codec_language_id or {})}
    names = {normalise_language(lang) for lang in languages}
    return sorted(n for n in names if n is not None and n not in known)


def attach_language_rows(model: Any, names: list[str]) -> LanguageRows | None:
    """Give each new language a row in `model`'s config and a trainable vector on its talker.

    The vectors start from the mean of the existing language rows (a language-like point),
    and the allocation is a pure function of the base config, so a resumed run gets the same
    rows.
    """
    if not names:
        return None
    talker_config = model.config.talker_config
    rows = free_rows(talker_config, len(names))
    table = model.talker.model.codec_embedding.weight
    known = [int(v) for v in (talker_config.codec_language_id or {}).values()]
    base = table[mx.array(known)].mean(axis=0) if known else table[talker_config.codec_pad_id]
    init = mx.broadcast_to(base.astype(mx.float32), (len(names), table.shape[1]))
    module = LanguageRows(names, rows, mx.array(init))
    talker_config.codec_language_id = {
        **(talker_config.codec_language_id or {}),
        **dict(zip(names, rows, strict=True)),
    }
    model.talker.language_rows = module
    return module


def write_row(model: Any, row: int, vector: np.ndarray) -> np.ndarray:
    """Write one codec_embedding row of a loaded model; returns its previous contents."""
    table = model.talker.model.codec_embedding
    weight = table.weight
    if vector.shape != (weight.shape[1],):
        raise ValueError(f"a codec row is {weight.shape[1]} wide, not {vector.shape}")
    previous = np.array(weight[row])
    weight[row] = mx.array(vector).astype(weight.dtype)
    table.weight = weight
    mx.eval(table.weight)
    return previous


def install_language_row(model: Any, name: str, row: int, vector: np.ndarray) -> np.ndarray:
    """Write a language row and name it in the model's `codec_language_id` (what an exported
    checkpoint holds); returns the row's previous contents."""
    previous = write_row(model, row, vector)
    talker_config = model.config.talker_config
    talker_config.codec_language_id = {**(talker_config.codec_language_id or {}), name: row}
    return previous


def remove_language_row(model: Any, name: str, row: int, previous: np.ndarray) -> None:
    write_row(model, row, previous)
    talker_config = model.config.talker_config
    talker_config.codec_language_id = {
        k: v for k, v in (talker_config.codec_language_id or {}).items() if int(v) != row
    }
