"""Tests for server.text_split."""

from __future__ import annotations

import random

import pytest

from server.text_split import normalise_whitespace, split_text


def _assert_tiles(pieces: list[str], text: str) -> None:
    """The pieces are the normalised text, in order, cut at single spaces or between chars."""
    normalised = normalise_whitespace(text)
    pos = 0
    for piece in pieces:
        assert piece, "empty piece"
        assert piece == piece.strip()
        assert normalised.startswith(piece, pos), (piece, normalised[pos : pos + 40])
        pos += len(piece)
        if pos < len(normalised) and normalised[pos] == " ":
            pos += 1
    assert pos == len(normalised)


def test_normalise_whitespace() -> None:
    assert normalise_whitespace("  a\n\tb  \u3000c\r\n") == "a b c"
    assert normalise_whitespace(" \n\t ") == ""


def test_splits_on_sentence_ends_keeping_punctuation() -> None:
    text = (
        "Hello there, how are you doing today?  I am fine, thank you very much.\n"
        "Let's go to the park right now!"
    )
    assert split_text(text) == [
        "Hello there, how are you doing today?",
        "I am fine, thank you very much.",
        "Let's go to the park right now!",
    ]


def test_ellipsis_and_closing_quotes_stay_with_their_sentence() -> None:
    text = (
        '"Are you coming with us?" she asked. He waited for a while… '
        'Then he finally said "yes, of course."'
    )
    assert split_text(text) == [
        '"Are you coming with us?" she asked.',
        "He waited for a while…",
        'Then he finally said "yes, of course."',
    ]


def test_abbreviations_and_initials_do_not_split() -> None:
    text = (
        "Dr. Smith met Mr. Jones at 3 p.m. today in the lab. "
        "They talked about e.g. physics, chemistry, etc. and more. "
        "See Fig. 3 and No. 5 in the report by J. R. Tolkien."
    )
    assert split_text(text) == [
        "Dr. Smith met Mr. Jones at 3 p.m. today in the lab.",
        "They talked about e.g. physics, chemistry, etc. and more.",
        "See Fig. 3 and No. 5 in the report by J. R. Tolkien.",
    ]


def test_decimals_do_not_split() -> None:
    text = "The value of pi is roughly 3.14159 in most books. Euler's number is 2.71828 or so."
    assert split_text(text) == [
        "The value of pi is roughly 3.14159 in most books.",
        "Euler's number is 2.71828 or so.",
    ]


def test_cjk_sentence_ends_split_without_spaces() -> None:
    first = "今天天气很好，阳光明媚，我们一起去公园散步吧。"
    second = "我觉得这是一个非常好的主意，你觉得怎么样呢？"
    third = "当然可以，我们现在马上就出发去公园里散步吧！"
    assert split_text(first + second + third) == [first, second, third]
    assert split_text("你好。谢谢！再见？", min_chars=0) == ["你好。", "谢谢！", "再见？"]


def test_devanagari_danda() -> None:
    first = "मेरा नाम राहुल है और मैं दिल्ली में रहता हूँ।"
    second = "मुझे किताबें पढ़ना बहुत पसंद है॥"
    third = "आप कैसे हैं और आप कहाँ रहते हैं?"
    assert split_text(f"{first} {second} {third}") == [first, second, third]


def test_short_fragments_merge_into_a_neighbour() -> None:
    text = "Hi. Yes. Okay then, let us begin the meeting right now. Fine."
    assert split_text(text) == [text]
    long_first = "This first sentence is comfortably longer than twenty characters."
    assert split_text(f"{long_first} Ok.") == [f"{long_first} Ok."]
    # Merging never breaks the length limit.
    assert split_text("Hi. There.", max_chars=6) == ["Hi.", "There."]


def test_long_sentence_splits_at_clauses_then_spaces() -> None:
    text = ", ".join(f"this is clause number {i} of a long sentence" for i in range(30)) + "."
    pieces = split_text(text, max_chars=120)
    assert len(pieces) > 1
    assert all(len(p) <= 120 for p in pieces)
    assert all(p.endswith(",") for p in pieces[:-1])
    assert " ".join(pieces) == text

    words = " ".join(f"word{i}" for i in range(400))  # no punctuation at all
    pieces = split_text(words, max_chars=100)
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces) == words  # every cut at a space: no word is broken
    assert all(len(p) > 80 for p in pieces[:-1])  # and pieces are packed full


def test_long_unpunctuated_unspaced_text_is_hard_split() -> None:
    text = "abcdefghij" * 500  # 5000 chars, no punctuation, no spaces
    pieces = split_text(text)
    assert [len(p) for p in pieces] == [300] * 16 + [200]
    assert "".join(pieces) == text


def test_hard_split_keeps_combining_marks_with_their_letter() -> None:
    text = "कि" * 400  # consonant + vowel sign (a combining mark), no spaces
    pieces = split_text(text, max_chars=51)
    assert "".join(pieces) == text
    assert all(len(p) <= 51 for p in pieces)
    assert all(p.startswith("क") for p in pieces)


def test_degenerate_inputs() -> None:
    assert split_text("") == []
    assert split_text(" \n\t ") == []
    assert split_text("...") == ["..."]
    assert split_text("abc", max_chars=1) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="max_chars"):
        split_text("text", max_chars=0)


_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "speech",
    "synthesis", "streaming", "Dr.", "Mr.", "e.g.", "i.e.", "etc.", "3.14", "1,000", "No.", "5",
]  # fmt: skip
_PUNCT = [".", "!", "?", "…", ",", ";", ":", "?!", "...", '."', "。", "！", "，", "।", "॥"]
_SPACES = [" ", " ", " ", "  ", "\n", "\t", " \n ", "\u3000"]


def _random_text(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(0, 250)):
        roll = rng.random()
        if roll < 0.6:
            parts.append(rng.choice(_WORDS))
        elif roll < 0.75:
            parts.append(rng.choice(_PUNCT))
        elif roll < 0.85:
            parts.append(
                "".join(rng.choice("天气很好我们公园散步") for _ in range(rng.randint(1, 60)))
            )
        elif roll < 0.9:
            parts.append(rng.choice("कमलनदी") * rng.randint(1, 400))  # a long unspaced run
        elif roll < 0.95:
            parts.append(rng.choice(["मेरा", "नाम", "है", "हूँ", "किताबें"]))
        parts.append(rng.choice(_SPACES) if rng.random() < 0.8 else "")
    return "".join(parts)


@pytest.mark.parametrize("seed", range(40))
def test_random_texts_keep_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    text = _random_text(rng)
    for max_chars in (1, 7, 40, 300):
        pieces = split_text(text, max_chars=max_chars)
        assert all(0 < len(p) <= max_chars for p in pieces)
        _assert_tiles(pieces, text)
        if not normalise_whitespace(text):
            assert pieces == []


@pytest.mark.parametrize("seed", range(20))
def test_random_spaced_texts_join_back_exactly(seed: int) -> None:
    rng = random.Random(1000 + seed)
    tokens = [
        rng.choice(_WORDS) + (rng.choice([".", "!", "?", ",", ""]) if rng.random() < 0.3 else "")
        for _ in range(rng.randint(1, 400))
    ]
    text = "".join(t + rng.choice(_SPACES) for t in tokens)
    for max_chars in (20, 60, 300):
        pieces = split_text(text, max_chars=max_chars)
        assert all(0 < len(p) <= max_chars for p in pieces)
        assert " ".join(pieces) == normalise_whitespace(text)
