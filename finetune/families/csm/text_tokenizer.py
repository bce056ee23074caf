"""A small Llama-3-style byte-level BPE fast tokenizer for tiny CSM checkpoints.

CSM reads its text through the Llama-3.2 tokenizer: byte-level BPE with Llama-3's split regex,
`<|begin_of_text|>` (128000) and `<|end_of_text|>` (128001) around every segment (Sesame's
`load_llama3_tokenizer` installs a `bos $A eos` post-processor), 256 special tokens from 128000
to 128255, and a 128256-row text embedding. Here the merges are learned on a small built-in
English corpus (the seed picks the sentences), the vocabulary is padded with never-produced
filler entries so that the special tokens land on their real ids, and the result is written as
`tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`, the files
`AutoTokenizer.from_pretrained(dir)` reads. The post-processor already adds bos and eos, so the
tokenizer loaded from `text_tokenizer` behaves like Sesame's patched one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
BOS_ID = 128000
EOS_ID = 128001
TEXT_VOCAB_SIZE = 128256
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_VOCAB_SIZE = 1200
FILLER_TEMPLATE = "<|vf_filler_{}|>"
MODEL_MAX_LENGTH = 131072


def special_tokens() -> list[str]:
    """Llama 3.1 / 3.2's 256 special tokens, in id order from 128000."""
    named = {
        0: BOS_TOKEN,
        1: EOS_TOKEN,
        4: "<|finetune_right_pad_id|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    tokens: list[str] = []
    reserved = 0
    for offset in range(TEXT_VOCAB_SIZE - BOS_ID):
        if offset in named:
            tokens.append(named[offset])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


_SUBJECTS = (
    "The speaker",
    "My friend",
    "Our teacher",
    "A small child",
    "The old fisherman",
    "Her sister",
    "The new manager",
    "The little robot",
    "Your voice",
    "Everyone here",
)
_VERBS = ("reads", "writes", "explains", "remembers", "answers", "describes", "finds", "loves")
_OBJECTS = (
    "the long letter",
    "a short story",
    "every question",
    "the quiet library",
    "the evening news",
    "a warm cup of tea",
    "the final answer",
    "the green bicycle",
)
_TAILS = ("today", "every morning", "before dinner", "at night", "once again", "right now")
_FIXED = (
    "Hello from Sesame.",
    "Hello, how are you doing today?",
    "I'm fine, thank you! And you?",
    "Please speak clearly and slowly.",
    "It's 7:45 in the morning, and the bus is late.",
    "Wait... what did you just say?!",
    "They've been waiting for hours; they're tired.",
    "Good night, and sweet dreams.",
)


def _corpus(seed: int) -> list[str]:
    """A few hundred short lines, many with a `[speaker]` prefix; deterministic per seed."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(400):
        sentence = (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_TAILS)}{rng.choice('.!?.')}"
        )
        lines.append(f"[{rng.randrange(10)}]{sentence}" if rng.random() < 0.7 else sentence)
    for _ in range(60):
        n = rng.randrange(0, 100000)
        lines.append(f"[{rng.randrange(10)}]Number {n} is {'even' if n % 2 == 0 else 'odd'}.")
    lines.extend(_FIXED)
    rng.shuffle(lines)
    return lines


def build_tokenizer(seed: int = 0):  # -> tokenizers.Tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre
    learner.train_from_iterator(
        _corpus(seed),
        trainer=trainers.BpeTrainer(
            vocab_size=BPE_VOCAB_SIZE,
            min_frequency=2,
            show_progress=False,
            initial_alphabet=sorted(alphabet),
            limit_alphabet=len(alphabet),
        ),
    )
    learned = json.loads(learner.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(learned["vocab"].items(), key=lambda item: item[1]))
    if len(vocab) >= BOS_ID:
        raise ValueError("BPE vocabulary collides with the special-token id range")
    while len(vocab) < BOS_ID:
        vocab[FILLER_TEMPLATE.format(len(vocab))] = len(vocab)
    pairs = (m.split(" ", 1) if isinstance(m, str) else m for m in learned["merges"])
    merges = [(str(a), str(b)) for a, b in pairs]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special_tokens())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0 {BOS_TOKEN}:1 $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)],
    )
    if tokenizer.token_to_id(BOS_TOKEN) != BOS_ID or tokenizer.get_vocab_size() != TEXT_VOCAB_SIZE:
        raise RuntimeError("tiny CSM tokenizer: special tokens are not on their real ids")
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    return {
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tiny_llama3_tokenizer(out_dir: Path, *, seed: int = 0) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json; same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str() + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
