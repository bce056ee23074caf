"""Splitting long text into sentence-sized pieces, so speech can stream sentence by sentence.

Pieces are cut from the whitespace-normalised text, in order, without losing or adding a
character: consecutive pieces were separated by one space, or by nothing where the cut
had to fall inside unspaced text (CJK sentences, clause breaks after full-width commas,
hard cuts through very long words). So for ordinary spaced text
``" ".join(split_text(t)) == normalise_whitespace(t)``.

Sentence ends are ``. ! ? …`` (in runs, optionally followed by closing quotes or
brackets) and the Devanagari dandas ``। ॥``, each followed by whitespace or the end of the
text, plus the full-width CJK ``。！？``, which end a sentence wherever they are. So a dot
between digits ("3.14") never ends one. Nor does a Latin stop before a lowercase word
('"Really?" she asked'), nor a dot after a common abbreviation ("Dr.", "e.g.", "No. 5")
or a single capital initial ("J. Smith").

Short sentences are merged into a neighbour; pieces longer than ``max_chars`` are split at
clause punctuation, then at spaces, and as a last resort every ``max_chars`` characters.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Final

DEFAULT_MAX_CHARS: Final = 300
DEFAULT_MIN_CHARS: Final = 20

_CLOSERS: Final = "\"'”’»)]}」』）》〉】"
_SENTENCE_END_RE: Final = re.compile(
    rf"(?:[.!?…‼⁇⁈⁉]+|[।॥]+)[{re.escape(_CLOSERS)}]*(?=\s|$)"
    rf"|[。！？]+[{re.escape(_CLOSERS)}]*"
)
_CLAUSE_END_RE: Final = re.compile(
    rf"(?:[,;:]|\s[-–—])[{re.escape(_CLOSERS)}]*(?=\s)"
    rf"|[、，；：][{re.escape(_CLOSERS)}]*"
)
_WORD_BEFORE_DOT_RE: Final = re.compile(r"([^\W\d_]+(?:\.[^\W\d_]+)*)\.$")

# Lowercased, without the final dot. Missing a sentence end only makes a piece longer;
# cutting after "Dr." would put a pause in the middle of a name, so the list errs wide.
ABBREVIATIONS: Final[frozenset[str]] = frozenset(
    {
        "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "ft", "rev", "hon",
        "gen", "col", "capt", "lt", "sgt", "gov", "sen", "rep", "pres", "vs", "etc", "al",
        "cf", "e.g", "i.e", "a.k.a", "approx", "est", "dept", "inc", "ltd", "co", "corp",
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
        "a.m", "p.m", "u.s", "u.k", "ph.d", "ave", "blvd", "rd", "sq", "min", "max",
    }
)  # fmt: skip
# Abbreviations that only hold before a number ("No. 5", "Fig. 3", "pp. 10-12").
NUMBER_ABBREVIATIONS: Final[frozenset[str]] = frozenset(
    {"no", "nos", "nr", "fig", "figs", "vol", "vols", "p", "pp", "ch", "sec", "art", "eq"}
)


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace (any Unicode space, tab, newline) to one space."""
    return " ".join(text.split())


def _is_sentence_end(text: str, end: int, match: str) -> bool:
    """Whether a match of _SENTENCE_END_RE ending at ``end`` really ends a sentence."""
    after = end + 1 if text[end : end + 1].isspace() else end  # the text is normalised
    next_char = text[after : after + 1]
    if match[0] in "।॥。！？":
        return True
    if next_char.islower():
        return False  # '"Really?" she asked', "approx. five", unknown abbreviations
    if match.rstrip(_CLOSERS) != ".":
        return True  # "!", "?", "...", "…"
    dot = end - len(match)
    word = _WORD_BEFORE_DOT_RE.search(text, max(0, dot - 24), dot + 1)
    if word is None:
        return True
    token = word.group(1)
    lowered = token.lower()
    if lowered in ABBREVIATIONS:
        return False
    if lowered in NUMBER_ABBREVIATIONS and next_char.isdigit():
        return False
    # A single capital is an initial ("J. Smith"), except the pronoun "I".
    return not (len(token) == 1 and token.isupper() and token != "I")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END_RE.finditer(text):
        if _is_sentence_end(text, match.end(), match.group()):
            spans.append((start, match.end()))
            start = match.end()
    spans.append((start, len(text)))
    return [s for s in (_strip(text, a, b) for a, b in spans) if s[0] < s[1]]


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _cut_spans(text: str, start: int, end: int, cuts: Iterator[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for cut in cuts:
        if start < cut < end:
            spans.append(_strip(text, start, cut))
            start = cut
    spans.append(_strip(text, start, end))
    return [s for s in spans if s[0] < s[1]]


def _clause_cuts(text: str, start: int, end: int) -> Iterator[int]:
    for match in _CLAUSE_END_RE.finditer(text, start, end):
        yield match.end()


def _space_cuts(text: str, start: int, end: int) -> Iterator[int]:
    for index in range(start, end):
        if text[index].isspace():
            yield index


def _hard_cuts(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    while end - start > max_chars:
        cut = start + max_chars
        # Keep combining marks (Devanagari vowel signs, accents) with their base letter.
        while cut > start + 1 and unicodedata.category(text[cut])[0] == "M":
            cut -= 1
        spans.append((start, cut))
        start = cut
    spans.append((start, end))
    return spans


_Splitter = Callable[[str, int, int], Iterator[int]]
_SPLITTERS: Final[tuple[_Splitter, ...]] = (_clause_cuts, _space_cuts)


def _split_long(
    text: str, start: int, end: int, max_chars: int, level: int = 0
) -> list[tuple[int, int]]:
    """Cut one span into pieces of at most max_chars, coarsest boundaries first."""
    if end - start <= max_chars:
        return [(start, end)]
    if level == len(_SPLITTERS):
        return _hard_cuts(text, start, end, max_chars)
    parts: list[tuple[int, int]] = []
    for a, b in _cut_spans(text, start, end, _SPLITTERS[level](text, start, end)):
        parts.extend(_split_long(text, a, b, max_chars, level + 1))
    return _pack(parts, max_chars)


def _pack(spans: list[tuple[int, int]], max_chars: int) -> list[tuple[int, int]]:
    """Greedily join neighbouring spans while the joined piece fits in max_chars."""
    packed: list[tuple[int, int]] = []
    for start, end in spans:
        if packed and end - packed[-1][0] <= max_chars:
            packed[-1] = (packed[-1][0], end)
        else:
            packed.append((start, end))
    return packed


def _merge_short(
    spans: list[tuple[int, int]], min_chars: int, max_chars: int
) -> list[tuple[int, int]]:
    """Join sentences shorter than min_chars to the next one (the last to the previous)."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged:
            prev_start, prev_end = merged[-1]
            if prev_end - prev_start < min_chars and end - prev_start <= max_chars:
                merged[-1] = (prev_start, end)
                continue
        merged.append((start, end))
    if len(merged) >= 2:
        (a, _), (c, d) = merged[-2], merged[-1]
        if d - c < min_chars and d - a <= max_chars:
            merged[-2:] = [(a, d)]
    return merged


def split_text(
    text: str, max_chars: int = DEFAULT_MAX_CHARS, *, min_chars: int = DEFAULT_MIN_CHARS
) -> list[str]:
    """Split ``text`` into sentence-sized pieces of at most ``max_chars`` characters.

    Never returns an empty piece; whitespace-only text gives ``[]``. See the module
    docstring for the boundaries used and the invariant that the pieces satisfy.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    normalised = normalise_whitespace(text)
    if not normalised:
        return []
    sentences = _merge_short(_sentence_spans(normalised), min_chars, max_chars)
    pieces: list[tuple[int, int]] = []
    for start, end in sentences:
        pieces.extend(_split_long(normalised, start, end, max_chars))
    return [normalised[start:end] for start, end in pieces]


def whole_sentences_end(text: str) -> int:
    """How much of the front of streamed-in `text` (whitespace runs collapsed) is whole
    sentences: up to the last sentence end that the next word has confirmed (a dot at the very
    end may yet be "3.14" or "Dr. Smith", a "?" yet be followed by "she asked"); 0 if none."""
    end = 0
    for match in _SENTENCE_END_RE.finditer(text):
        stop = match.end()
        confirmed = stop + 1 < len(text) and text[stop].isspace() and not text[stop + 1].isspace()
        if confirmed and _is_sentence_end(text, stop, match.group()):
            end = stop
    return end
