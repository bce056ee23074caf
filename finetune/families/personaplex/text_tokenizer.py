"""The PersonaPlex text tokenizer (SentencePiece): a tiny trained stand-in, checks, decoding.

The real `tokenizer_spm_32k_3.model` has 32000 pieces with <unk>=0 (used as end-of-padding),
<s>=1, </s>=2, <pad>=3 (the text padding token). The tiny model keeps those four ids and is
much smaller than the language model's text vocabulary: code must never assume the two match
(ids past the tokenizer's size decode to None).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from finetune.families.personaplex.layout import (
    SYSTEM_TAG,
    TEXT_BOS_ID,
    TEXT_EOS_ID,
    TEXT_EPAD_ID,
    TEXT_PAD_ID,
)

TINY_VOCAB_SIZE = 200
PROBE_TEXT = "You enjoy having a good conversation."
SPIECE_SPACE = "\u2581"

_SUBJECTS = ("You", "We", "The assistant", "Your friend", "The teacher", "A customer", "They")
_VERBS = ("enjoy", "like", "answer", "explain", "discuss", "remember", "help with", "talk about")
_OBJECTS = (
    "having a good conversation",
    "questions about technology",
    "the weather today",
    "a deep conversation",
    "cooking dinner",
    "the train schedule",
    "an order that arrived late",
    "music and films",
    "the history of science",
    "a new project",
)
_TAILS = (".", "!", "?", " with care.", " in a clear way.", " every day.", " right now.")
_ROLES = (
    "You are a wise and friendly teacher.",
    "You work for a delivery company and help customers.",
    "Your name is Jane.",
    "You enjoy having a good conversation.",
    "Answer questions or provide advice in a clear and engaging way.",
)


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(400):
        lines.append(
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            f"{rng.choice(_TAILS)}"
        )
    for _ in range(120):
        role = " ".join(rng.sample(_ROLES, rng.randrange(1, 4)))
        lines.append(f"{SYSTEM_TAG} {role} {SYSTEM_TAG}")
    for _ in range(60):
        n = rng.randrange(0, 10000)
        lines.append(f"Number {n} is {'even' if n % 2 == 0 else 'odd'}, okay? ({n % 97})")
    lines.extend(_ROLES)
    rng.shuffle(lines)
    return lines


def train_tiny_spm(seed: int = 0, vocab_size: int = TINY_VOCAB_SIZE) -> bytes:
    """A small unigram SentencePiece model with PersonaPlex's special ids (seed -> same bytes)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed + 1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=TEXT_EPAD_ID,
        bos_id=TEXT_BOS_ID,
        eos_id=TEXT_EOS_ID,
        pad_id=TEXT_PAD_ID,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        hard_vocab_limit=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def write_tiny_spm(path: Path, *, seed: int = 0) -> None:
    Path(path).write_bytes(train_tiny_spm(seed))


def load_spm(path: Path) -> Any:
    """A SentencePieceProcessor (raises OSError / RuntimeError on an unreadable file)."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    processor.Load(str(path))
    return processor


def tokenizer_problems(tokenizer: Any, text_vocab: int) -> list[str]:
    """What would break PersonaPlex's use of this tokenizer."""
    problems: list[str] = []
    size = tokenizer.get_piece_size()
    if size > text_vocab:
        problems.append(f"text tokenizer has {size} pieces, more than the model's {text_vocab}")
    expected = {
        TEXT_EPAD_ID: "<unk>",
        TEXT_BOS_ID: "<s>",
        TEXT_EOS_ID: "</s>",
        TEXT_PAD_ID: "<pad>",
    }
    for idx, piece in expected.items():
        got = tokenizer.id_to_piece(idx) if idx < size else None
        if got != piece:
            problems.append(f"text tokenizer id {idx} is {got!r}, expected {piece!r}")
    ids = tokenizer.encode(PROBE_TEXT)
    if not ids or tokenizer.decode(ids) != PROBE_TEXT:
        problems.append(f"text tokenizer does not round-trip {PROBE_TEXT!r}")
    return problems


def token_text(tokenizer: Any, token: int) -> str | None:
    """The text a sampled token stands for; None for padding, specials and out-of-range ids."""
    if token in (TEXT_EPAD_ID, TEXT_PAD_ID) or not 0 <= token < tokenizer.get_piece_size():
        return None
    if tokenizer.is_control(token) or tokenizer.is_unknown(token) or tokenizer.is_unused(token):
        return None
    return str(tokenizer.id_to_piece(token)).replace(SPIECE_SPACE, " ")


def wrap_with_system_tags(text: str) -> str:
    cleaned = text.strip()
    if cleaned.startswith(SYSTEM_TAG) and cleaned.endswith(SYSTEM_TAG):
        return cleaned
    return f"{SYSTEM_TAG} {cleaned} {SYSTEM_TAG}"


def text_prompt_tokens(tokenizer: Any, text: str | None) -> list[int]:
    """The forced text tokens of a role prompt (none for None / blank text), as NVIDIA's server."""
    if text is None or not text.strip():
        return []
    return [int(t) for t in tokenizer.encode(wrap_with_system_tags(text))]
