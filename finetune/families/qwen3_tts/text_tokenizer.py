"""A small but real Qwen2-style byte-level BPE text tokenizer for tiny Qwen3-TTS checkpoints.

``write_tiny_qwen_tokenizer(out_dir, seed=...)`` writes ``vocab.json``, ``merges.txt`` and
``tokenizer_config.json`` (the slow-format Qwen2 tokenizer files) so that
``transformers.AutoTokenizer.from_pretrained(out_dir)`` (what mlx-audio's
Qwen3-TTS ``post_load_hook`` calls, offline) builds a ``Qwen2Tokenizer`` from them. No
``tokenizer.json`` is written: transformers 5 builds the fast tokenizer from vocab/merges with
Qwen2's own pipeline (NFC normaliser, Qwen2 split regex, byte-level pre-tokeniser and decoder),
which is exactly what we want to exercise. As with the real tokenizer, text is NFC-normalised,
so ``decode(encode(text)) == unicodedata.normalize("NFC", text)``.

What is real and what is not
----------------------------
* Real structure: GPT-2 byte-to-unicode alphabet (all 256 byte symbols are ids 0..255, in
  GPT-2/Qwen order, so e.g. ``'Ċ'`` (``\\n``) is 198 and ``'Ġ'`` (space) is 220 as in Qwen),
  Qwen2's pre-tokenizer regex, BPE merges ranked in id order (rank ``r`` produces id
  ``256 + r``), ``<|im_end|>`` as eos and ``<|endoftext|>`` as pad, model_max_length 131072.
* Not real: the merges. They are learned with ``tokenizers``' ``BpeTrainer`` (vocab <= 2000)
  on a corpus generated from built-in English / Hindi (Devanagari) / Chinese templates; the
  ``seed`` only picks which template sentences form that corpus. The trainer was checked to be
  deterministic across runs/processes (same seed -> byte-identical files). The role words
  ``system``/``user``/``assistant`` are frequent in the corpus so that each of them is a single
  token, as in the real tokenizer (mlx-audio slices ``<|im_start|>assistant\\n{text}<|im_end|>
  \\n<|im_start|>assistant\\n`` as ``[:3]`` / ``[3:-5]`` / ``[3:-2]``).
* Filler: between the last merge and 151642 the vocab is padded with ``<|vf_filler_<id>|>``
  entries. They are ordinary vocab entries (not added/special tokens) that no merge can
  produce, so they are never emitted by encoding; they only exist so the added tokens below
  land on their real ids.

Added tokens (ids are the real ones)
------------------------------------
* 151643-151664: Qwen2.5's list (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, the
  object_ref/box/quad/vision/image/video tokens, ``<tool_call>``, ``</tool_call>``, the FIM
  tokens, ``<|repo_name|>``, ``<|file_sep|>``), from the Qwen2.5/Qwen3 ``tokenizer_config.json``.
* 151665-151668: Qwen3's ``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``.
  The ``special`` flags of 151643-151668 follow Qwen3 (tool/FIM/think tokens are not special).
* 151669-151674: ``<|audio_start|>``, ``<|audio_end|>``, ``<tts_pad>``, ``<tts_text_bos>``,
  ``<tts_text_eod>``, ``<tts_text_bos_single>``. The tts ids match mlx-audio's Qwen3-TTS
  config defaults (``tts_pad/bos/eos_token_id`` 151671/151672/151673) and transformers'
  Qwen3-Omni talker config (``audio_start_token_id`` 151669, same tts ids).
* 151675: ``<|audio_pad|>`` - inferred, not verified against the Qwen3-TTS checkpoint: Qwen3-Omni
  uses 151675 as its audio token id, and later Qwen tokenizers list the same seven audio/tts
  tokens in the order audio_start, audio_end, tts_pad, tts_text_bos, tts_text_eod,
  tts_text_bos_single, audio_pad.
  The audio/tts tokens are marked special.

Total vocabulary: 151676 entries (ids 0..151675), below the talker's ``text_vocab_size`` 151936.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = [
    "ADDED_TOKENS",
    "EOS_TOKEN",
    "FILLER_TEMPLATE",
    "MODEL_MAX_LENGTH",
    "PAD_TOKEN",
    "QWEN2_PRETOKENIZE_REGEX",
    "VOCAB_SIZE",
    "bytes_to_unicode",
    "write_tiny_qwen_tokenizer",
]

# Qwen2's pre-tokenizer regex (transformers' ``tokenization_qwen2.PRETOKENIZE_REGEX``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (id, content, special) - see the module docstring for provenance.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
    (151669, "<|audio_start|>", True),
    (151670, "<|audio_end|>", True),
    (151671, "<tts_pad>", True),
    (151672, "<tts_text_bos>", True),
    (151673, "<tts_text_eod>", True),
    (151674, "<tts_text_bos_single>", True),
    (151675, "<|audio_pad|>", True),
)
FIRST_ADDED_ID = ADDED_TOKENS[0][0]
VOCAB_SIZE = ADDED_TOKENS[-1][0] + 1  # len(tokenizer): 151676
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 131072
FILLER_TEMPLATE = "<|vf_filler_{}|>"
BPE_VOCAB_SIZE = 2000  # byte alphabet + learned merges (upper bound)

# ---------------------------------------------------------------------------------------------
# Built-in training corpus (templates; ``seed`` picks the combinations)
# ---------------------------------------------------------------------------------------------
_EN_SUBJECTS = (
    "The assistant",
    "The user",
    "The system",
    "My friend",
    "Our teacher",
    "A small child",
    "The old fisherman",
    "Her younger sister",
    "This company",
    "The weather report",
    "Every student",
    "The tired doctor",
    "A quiet neighbour",
    "The new manager",
    "His father",
    "The little robot",
    "Your voice",
    "The morning train",
    "Nobody",
    "Everyone here",
)
_EN_VERBS = (
    "reads",
    "writes",
    "explains",
    "remembers",
    "answers",
    "follows",
    "describes",
    "watches",
    "opens",
    "closes",
    "finds",
    "builds",
    "sings about",
    "talks about",
    "waits for",
    "thinks about",
    "carries",
    "repairs",
    "forgets",
    "loves",
)
_EN_OBJECTS = (
    "the long letter",
    "a short story",
    "the broken window",
    "every question",
    "the river near the mountain",
    "a bright yellow kite",
    "the quiet library",
    "our old house",
    "the evening news",
    "a warm cup of tea",
    "the first chapter",
    "the weekly schedule",
    "a strange sound",
    "the garden gate",
    "the final answer",
    "the music of the city",
    "a hidden message",
    "the green bicycle",
    "the lesson plan",
    "the open market",
)
_EN_TAILS = (
    "today",
    "every morning",
    "before dinner",
    "after the meeting",
    "in the afternoon",
    "with great care",
    "without a word",
    "at night",
    "once again",
    "very slowly",
    "on Sunday",
    "for the second time",
    "right now",
    "in the spring",
    "again and again",
)
_EN_FIXED = (
    "Hello, how are you doing today?",
    "I'm fine, thank you! And you?",
    "Please speak clearly and slowly.",
    "Can you read this sentence out loud?",
    "It's 7:45 in the morning, and the bus is late.",
    "The meeting starts at 10:30 on 12/05/2024.",
    "She bought 3 apples, 12 eggs and 2 loaves of bread for $14.50.",
    "Call me at 555-0199 if you need anything.",
    "Wait... what did you just say?!",
    '"Yes," he said, "we\'ll be there soon."',
    "They've been waiting for hours; they're tired.",
    "You're the assistant, and I'm the user.",
    "The system prompt tells the assistant how to behave.",
    "system: You are a helpful assistant.",
    "user: Please read the next line.",
    "assistant: Of course, here it is.",
    "Speak in a warm and friendly tone.",
    "A calm, deep voice with a slight British accent.",
    "Good night, and sweet dreams.",
    "Turn left at the second street, then walk 200 meters.",
)
_ROLES = ("system", "user", "assistant")
_EN_COMMON_WORDS = (
    "about above across after again against almost along already also always among animal "
    "another answer around away back because become before begin behind believe below "
    "between beyond bird black blue body book both bread bring brother brown build busy "
    "call came careful carry change child children city clean clear close cold color come "
    "common country course cover cross dance dark daughter deep different dinner doctor "
    "door down draw dream drink drive during early earth east easy eight either empty "
    "enough evening every example face fall family famous farm fast father feel field "
    "fifteen figure fire first fish five floor flower follow food foot forest forward four "
    "free fresh friend front full game garden gentle girl give glass gold good great green "
    "ground group grow half hand happy hard head hear heart heavy help here high hold home "
    "hope horse hour house hundred idea important inside island journey just keep kind "
    "king kitchen know land language large laugh learn leave letter light listen little "
    "live long look machine make many market matter measure middle might minute money "
    "month moon mother move music name nature near never night north nothing notice number "
    "ocean office often only open order other outside paper part party people perhaps "
    "picture piece place plain plant play point power present pretty problem pull question "
    "quick quiet rain reach ready real reason record river road rock room round rule "
    "school science season second seven shape share short should show side simple since "
    "sister size sleep small snow soft some song soon sound south space special spring "
    "stand star start station still stone story street strong study summer sun sure "
    "table take teacher tell thank thing think third thousand three through time today "
    "together tomorrow town travel tree true try turn twelve under until usual valley "
    "very village visit voice walk want warm watch water wave week welcome well west "
    "white whole window winter wish without woman wonder word work world write yellow "
    "yesterday young"
)

_HI_SUBJECTS = ("मैं", "हम", "वह", "मेरा दोस्त", "बच्चे", "शिक्षक", "आप", "मेरी माँ")
_HI_OBJECTS = (
    "पानी",
    "किताब",
    "खाना",
    "गाना",
    "कहानी",
    "चिट्ठी",
    "सवाल",
    "घर",
    "स्कूल",
    "बाज़ार",
)
_HI_VERBS = (
    "पढ़ते हैं",
    "लिखते हैं",
    "देखते हैं",
    "सुनते हैं",
    "पसंद करते हैं",
    "लाते हैं",
    "समझते हैं",
    "ढूँढते हैं",
)
_HI_TAILS = ("आज", "हर दिन", "सुबह", "शाम को", "कल", "अभी", "बहुत ध्यान से", "फिर से")
_HI_FIXED = (
    "नमस्ते, आप कैसे हैं?",
    "मैं ठीक हूँ, धन्यवाद।",
    "आज मौसम बहुत अच्छा है।",
    "भारत एक बड़ा देश है।",
    "हमें पानी पीना चाहिए।",
    "मुझे किताब पढ़ना पसंद है।",
    "बच्चे स्कूल जाते हैं।",
    "कृपया धीरे और साफ़ बोलिए।",
)

_ZH_SUBJECTS = ("我", "我们", "他", "她", "老师", "孩子们", "你", "我的朋友")
_ZH_VERBS = ("喜欢", "在看", "想买", "正在读", "听说了", "找到了", "需要", "记得")
_ZH_OBJECTS = (
    "这本书",
    "一杯茶",
    "那个公园",
    "新的手机",
    "中文课",
    "北京的天气",
    "上海的夜景",
    "一个故事",
    "这首歌",
    "明天的会议",
)
_ZH_TAILS = ("。", "！", "吗？", "，真的很好。", "，今天。", "，已经很久了。")
_ZH_FIXED = (
    "你好，很高兴认识你。",
    "今天天气很好，我们一起去公园吧。",
    "谢谢你的帮助！",
    "这是一个测试句子。",
    "你吃饭了吗？",
    "明天见。",
    "请慢一点说。",
    "我正在学习中文。",
)

_ZH_COMMON = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过"
    "家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本"
    "见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己"
    "话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平"
)


def _corpus(seed: int) -> list[str]:
    """A few hundred short sentences; deterministic for a given seed."""
    rng = random.Random(seed)
    common = _EN_COMMON_WORDS.split()
    lines: list[str] = []
    for _ in range(260):
        lines.append(
            f"{rng.choice(_EN_SUBJECTS)} {rng.choice(_EN_VERBS)} "
            f"{rng.choice(_EN_OBJECTS)} {rng.choice(_EN_TAILS)}{rng.choice('.!?.')}"
        )
    for _ in range(90):
        lines.append(
            f"{rng.choice(_HI_SUBJECTS)} {rng.choice(_HI_TAILS)} "
            f"{rng.choice(_HI_OBJECTS)} {rng.choice(_HI_VERBS)}{rng.choice(('।', '?', '।'))}"
        )
    for _ in range(90):
        lines.append(
            f"{rng.choice(_ZH_SUBJECTS)}{rng.choice(_ZH_VERBS)}"
            f"{rng.choice(_ZH_OBJECTS)}{rng.choice(_ZH_TAILS)}"
        )
    for _ in range(80):
        chars = "".join(rng.choice(_ZH_COMMON) for _ in range(rng.randrange(6, 13)))
        lines.append(chars + rng.choice(("。", "，", "！", "？")))
    for _ in range(220):
        words = rng.sample(common, rng.randrange(5, 11))
        lines.append(" ".join(words).capitalize() + rng.choice((".", ",", "!", "?", ";")))
    for _ in range(60):
        n = rng.randrange(0, 100000)
        lines.append(f"Number {n} is {'even' if n % 2 == 0 else 'odd'}, isn't it? ({n % 97})")
    # Chat-shaped lines (without special tokens) so the role words are frequent whole words.
    for _ in range(60):
        role = rng.choice(_ROLES)
        body = rng.choice(_EN_FIXED + _HI_FIXED + _ZH_FIXED)
        lines.append(f"{role}\n{body}\n")
    lines.extend(_EN_FIXED + _HI_FIXED + _ZH_FIXED)
    rng.shuffle(lines)
    return lines


# ---------------------------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (insertion order = GPT-2/Qwen id order)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _train_merges(corpus: list[str]) -> list[tuple[str, str]]:
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    alphabet = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    for word in _ROLES:  # mlx-audio's prompt slicing relies on single-token role words
        if tok.encode(word).tokens != [word]:
            raise RuntimeError(f"tiny tokenizer: {word!r} is not a single BPE token")
    merges = json.loads(tok.to_str())["model"]["merges"]
    out: list[tuple[str, str]] = []
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for sym in bytes_to_unicode().values():
        vocab[sym] = len(vocab)
    for a, b in merges:
        merged = a + b
        if merged in vocab:  # cannot happen for a trained BPE; keep ranks == ids anyway
            raise ValueError(f"duplicate merge result {merged!r}")
        vocab[merged] = len(vocab)
    if len(vocab) >= FIRST_ADDED_ID:
        raise ValueError("BPE vocabulary collides with the added-token id range")
    while len(vocab) < FIRST_ADDED_ID:
        vocab[FILLER_TEMPLATE.format(len(vocab))] = len(vocab)
    return vocab


def _tokenizer_config() -> dict:
    decoder = {
        str(idx): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for idx, content, special in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_json(path: Path, obj: object, *, sort_keys: bool, compact: bool = False) -> None:
    if compact:
        text = json.dumps(obj, ensure_ascii=False, sort_keys=sort_keys, separators=(",", ":"))
    else:
        text = json.dumps(
            obj,
            ensure_ascii=False,
            indent=2,
            sort_keys=sort_keys,
            separators=(",", ": "),
        )
    path.write_text(text + "\n", encoding="utf-8", newline="\n")


def write_tiny_qwen_tokenizer(out_dir: Path, *, seed: int = 0) -> None:
    """Write a tiny Qwen2 byte-level BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json).

    Same ``seed`` -> byte-identical files. Added tokens sit on their real Qwen3-TTS ids
    (``<|endoftext|>`` 151643 ... ``<tts_text_bos_single>`` 151674, ``<|audio_pad|>`` 151675).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = _train_merges(_corpus(seed))
    vocab = _build_vocab(merges)
    # vocab.json keeps id order (as real Qwen files do); it is built deterministically.
    _write_json(out_dir / "vocab.json", vocab, sort_keys=False, compact=True)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8", newline="\n")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(), sort_keys=True)
