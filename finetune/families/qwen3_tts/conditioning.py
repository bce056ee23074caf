"""How a Qwen3-TTS voice conditions the talker: the ONE definition, for training and serving.

The trainer's layout (`layout.build_sequence`) and the server's batched prompt builder
(`serving.Qwen3Prompter`) both turn a `Conditioning` into the codec prefix here, so a voice is
served with exactly the prefix it was trained on:

    codec prefix = think part + [speaker vector] + [codec_pad, codec_bos]
    think part   = [think, think_bos, LANG, think_eos]  when the language has an id
                 = [nothink, think_bos, think_eos]      otherwise ("auto")

A language has an id when it is in the checkpoint's `codec_language_id` (including rows that
voicefoundry allocated for new languages). A named dialect speaker (`spk_is_dialect`) asked for
in Chinese or auto mode speaks with its dialect's id, as mlx-audio and the official model do.

What a voice records (`VoiceConditioning`, in voice.json under "conditioning") is turned into a
per-utterance `Conditioning` by `VoiceConditioning.utterance`, on both sides.

An instruct (CustomVoice: how to speak; VoiceDesign: the voice itself, described) goes in
front of everything, on the text channel only, wrapped as the reference wraps it (qwen_tts
`_build_instruct_text`, mlx-audio `_prepare_generation_inputs`):
`<|im_start|>user\n{instruct}<|im_end|>\n`, then the role tokens and the prefix above.

An in-context (ICL) clone adds a `Reference` to that: the reference clip's transcript tokens go
ahead of the text, and its codec frames follow codec_bos as if the model had spoken them, so the
model continues in that voice (the official `generate_voice_clone(ref_text=...)` and mlx-audio's
`_prepare_icl_generation_inputs` lay it out the same way; `layout.build_sequence` places it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

SPEAKER_SLOT = -2  # in a codec-id list: the codec embedding there is a speaker vector

# Where a voice's speaker vector comes from: a reference clip's speaker-encoder embedding (clone
# and language voices; training uses the same clip), a baked codec_embedding row, or none.
SpeakerSource = Literal["ref_clip", "baked", "none"]
SPEAKER_SOURCES: tuple[str, ...] = ("ref_clip", "baked", "none")

# What an instruct does on a checkpoint: "style" (CustomVoice: the delivery of its speakers)
# or "design" (VoiceDesign: the voice itself, from a description).
InstructUse = Literal["style", "design"]


def instruct_use(tts_model_type: str, tts_model_size: str | None) -> InstructUse | None:
    """None where the checkpoint takes no instruct: Base, and the 0.6B CustomVoice (both
    references drop its instruct: it was not trained with any)."""
    if tts_model_type == "voice_design":
        return "design"
    if tts_model_type == "custom_voice" and tts_model_size != "0b6":
        return "style"
    return None


def instruct_text(instruct: str) -> str:
    """The instruct as the talker reads it (the reference's user turn)."""
    return f"<|im_start|>user\n{instruct}<|im_end|>\n"


# How a clone voice uses its reference clip: its speaker-encoder x-vector only, or in context
# (the x-vector plus the clip's transcript and codec frames ahead of the text).
CloneMode = Literal["x_vector", "icl"]


@dataclass(frozen=True)
class SpecialIds:
    tts_pad: int
    tts_bos: int
    tts_eos: int
    codec_pad: int
    codec_bos: int
    codec_eos: int
    think: int
    nothink: int
    think_bos: int
    think_eos: int
    languages: dict[str, int]
    dialects: dict[str, str]  # speaker name -> its dialect language (only dialect speakers)

    @classmethod
    def from_config(cls, config: Any) -> SpecialIds:
        talker = config.talker_config
        return cls(
            tts_pad=config.tts_pad_token_id,
            tts_bos=config.tts_bos_token_id,
            tts_eos=config.tts_eos_token_id,
            codec_pad=talker.codec_pad_id,
            codec_bos=talker.codec_bos_id,
            codec_eos=talker.codec_eos_token_id,
            think=talker.codec_think_id,
            nothink=talker.codec_nothink_id,
            think_bos=talker.codec_think_bos_id,
            think_eos=talker.codec_think_eos_id,
            languages={k.lower(): int(v) for k, v in (talker.codec_language_id or {}).items()},
            dialects={
                k.lower(): str(v).lower()
                for k, v in (talker.spk_is_dialect or {}).items()
                if isinstance(v, str) and v
            },
        )


@dataclass(frozen=True)
class Conditioning:
    """The conditioning of one utterance."""

    language: str | None = None  # None or "auto": no language id
    speaker: bool = False  # a speaker vector sits in the prefix
    speaker_name: str | None = None  # a named (builtin or baked) speaker: its dialect applies
    # Language rows the voice brought (name -> codec row), ahead of the checkpoint's own ids.
    language_rows: tuple[tuple[str, int], ...] = ()
    instruct: str | None = None  # None or "": no instruct (the reference treats "" as none)


@dataclass(frozen=True)
class Reference:
    """An ICL clone's reference: its transcript's text tokens (without the chat template) and
    the clip's codec frames [T, 16], placed between the codec prefix and the generated frames."""

    text_ids: tuple[int, ...]
    codes: np.ndarray = field(repr=False)

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


def normalise_language(language: str | None) -> str | None:
    if language is None:
        return None
    lowered = language.strip().lower()
    return None if lowered in ("", "auto") else lowered


def language_id(ids: SpecialIds, cond: Conditioning) -> int | None:
    language = normalise_language(cond.language)
    languages = {**ids.languages, **dict(cond.language_rows)}
    lang_id = languages.get(language) if language is not None else None
    if language in (None, "chinese") and cond.speaker_name is not None:
        dialect = ids.dialects.get(cond.speaker_name.lower())
        if dialect is not None and dialect in ids.languages:
            lang_id = ids.languages[dialect]
    return lang_id


def codec_prefix(ids: SpecialIds, cond: Conditioning) -> list[int]:
    """Codec channel from the think part to codec_bos (SPEAKER_SLOT where the vector goes)."""
    lang_id = language_id(ids, cond)
    if lang_id is None:
        prefix = [ids.nothink, ids.think_bos, ids.think_eos]
    else:
        prefix = [ids.think, ids.think_bos, lang_id, ids.think_eos]
    if cond.speaker:
        prefix.append(SPEAKER_SLOT)
    return [*prefix, ids.codec_pad, ids.codec_bos]


@dataclass(frozen=True)
class VoiceConditioning:
    """What a voice package records about its conditioning (voice.json "conditioning")."""

    speaker: SpeakerSource
    language: str | None = None
    # Rows of the languages the voice trained that the checkpoint had no id for (languages.py),
    # as installed in the model that serves it.
    language_rows: tuple[tuple[str, int], ...] = ()

    def utterance(
        self, requested_language: str | None, speaker_name: str | None, instruct: str | None = None
    ) -> Conditioning:
        """An utterance in this voice: the requested language, else the trained one."""
        language = requested_language if requested_language is not None else self.language
        return Conditioning(
            language=language,
            speaker=self.speaker != "none",
            speaker_name=speaker_name if self.speaker == "baked" else None,
            language_rows=self.language_rows,
            instruct=instruct or None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"speaker": self.speaker, "language": self.language}

    @classmethod
    def from_dict(cls, data: Any) -> VoiceConditioning:
        if not isinstance(data, dict) or data.get("speaker") not in SPEAKER_SOURCES:
            raise ValueError(
                f"conditioning must be {{speaker: {'|'.join(SPEAKER_SOURCES)}, language}}, "
                f"not {data!r}"
            )
        language = data.get("language")
        if language is not None and not isinstance(language, str):
            raise ValueError(f"conditioning language must be a string, not {language!r}")
        return cls(speaker=data["speaker"], language=normalise_language(language))
