"""Tests for the tiny Qwen2-style text tokenizer written for tiny Qwen3-TTS checkpoints."""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path

from finetune.families.qwen3_tts.text_tokenizer import (
    ADDED_TOKENS,
    bytes_to_unicode,
    write_tiny_qwen_tokenizer,
)

import pytest

TEXT_VOCAB_SIZE = 151936  # the talker's text embedding rows
FILES = ("merges.txt", "tokenizer_config.json", "vocab.json")
TEXTS = (
    "Hello, world! This is a tiny test.",
    "The quick brown fox jumps over 13 lazy dogs.",
    "नमस्ते, आप कैसे हैं?",
    "你好，世界。今天天气很好！",
    "...",
    "?!",
    " leading space and trailing space ",
    "Mixed: hello नमस्ते 你好 42!",
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_qwen_tokenizer(out, seed=0)
    return out


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tok_dir))


def test_loads_offline_from_checkpoint_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tiny_qwen_tokenizer(tmp_path, seed=3)
    # A real checkpoint directory also holds the model's config.json (unknown model_type).
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_tts"}\n', encoding="utf-8")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    ids = tok.encode("<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assistant = tok.convert_tokens_to_ids("assistant")
    assert ids[:3] == [151644, assistant, 198]
    assert ids[-5:] == [151645, 198, 151644, assistant, 198]


def test_writes_expected_files_and_is_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    t0 = time.perf_counter()
    write_tiny_qwen_tokenizer(a, seed=0)
    assert time.perf_counter() - t0 < 2.0
    write_tiny_qwen_tokenizer(b, seed=0)
    write_tiny_qwen_tokenizer(c, seed=1)
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    for name in FILES:
        data = (a / name).read_bytes()
        assert data == (b / name).read_bytes(), name
        assert data.endswith(b"\n")
    assert (a / "merges.txt").read_bytes() != (c / "merges.txt").read_bytes()


def test_vocab_layout(tok_dir: Path) -> None:
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    ids = sorted(vocab.values())
    assert ids == list(range(len(ids)))
    # The model vocab ends right before <|endoftext|>.
    assert len(vocab) == ADDED_TOKENS[0][0]
    # All 256 byte symbols, in GPT-2 / Qwen order.
    for i, sym in enumerate(bytes_to_unicode().values()):
        assert vocab[sym] == i
    assert vocab["Ċ"] == 198 and vocab["Ġ"] == 220
    # Merge rank r produces id 256 + r.
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    merges = merges[1:]
    assert 1000 <= len(merges) <= 2000 - 256
    for rank, line in enumerate(merges):
        left, right = line.split(" ")
        assert vocab[left + right] == 256 + rank
    fillers = [t for t, i in vocab.items() if i >= 256 + len(merges)]
    assert fillers and all(t.startswith("<|vf_filler_") for t in fillers)

    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 131072
    decoder = config["added_tokens_decoder"]
    assert {int(k): v["content"] for k, v in decoder.items()} == {i: t for i, t, _ in ADDED_TOKENS}


def test_loads_as_qwen2_with_real_special_ids(tokenizer) -> None:
    assert type(tokenizer).__name__.startswith("Qwen2Tokenizer")
    assert 151674 < len(tokenizer) <= TEXT_VOCAB_SIZE
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<tool_call>": 151657,
        "</think>": 151668,
        "<|audio_start|>": 151669,
        "<|audio_end|>": 151670,
        "<tts_pad>": 151671,
        "<tts_text_bos>": 151672,
        "<tts_text_eod>": 151673,
        "<tts_text_bos_single>": 151674,
        "<|audio_pad|>": 151675,
    }
    for token, idx in expected.items():
        assert tokenizer.convert_tokens_to_ids(token) == idx, token
    for idx, token, _ in ADDED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) == idx
        assert tokenizer.encode(token) == [idx]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    for word in ("assistant", "user", "system", "\n"):
        assert len(tokenizer.encode(word)) == 1, word
    # Filler entries exist but are never produced by encoding.
    assert tokenizer.encode("<|vf_filler_3000|>") != [3000]


@pytest.mark.parametrize("text", TEXTS)
def test_chat_prompt_slices_like_mlx_audio(tokenizer, text: str) -> None:
    im_start, im_end = 151644, 151645
    assistant = tokenizer.convert_tokens_to_ids("assistant")
    nl = tokenizer.convert_tokens_to_ids("Ċ")
    assert nl == 198
    assert tokenizer.encode("\n") == [nl]

    ids = tokenizer.encode(f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n")
    assert ids[:3] == [im_start, assistant, nl]
    assert ids[-5:] == [im_end, nl, im_start, assistant, nl]
    assert all(0 <= i < TEXT_VOCAB_SIZE for i in ids)
    body = ids[3:-5]
    assert body == tokenizer.encode(text)
    assert tokenizer.decode(body) == text

    ref_ids = tokenizer.encode(f"<|im_start|>assistant\n{text}<|im_end|>\n")
    assert ref_ids[3:-2] == body

    instruct = tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n")
    assert instruct[:3] == [im_start, tokenizer.convert_tokens_to_ids("user"), nl]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    # Plain text never yields added tokens.
    assert ids and all(0 <= i < 151643 for i in ids)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert len(ids) < len(text.encode("utf-8"))  # merges actually compress
