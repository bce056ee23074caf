"""The Moshi / PersonaPlex binary WebSocket framing: the first byte of a message is its kind.

Existing Moshi and PersonaPlex clients speak this; our own SDK does too. The handshake carries a
protocol and a model version (two little-endian u32) after the kind byte, as Kyutai's Rust
server sends; Python clients that expect the bare byte ignore the rest.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from finetune.families.personaplex.sampling import SamplingParams

import msgspec

PROTOCOL_VERSION = 0
MODEL_VERSION = 0
SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # one Mimi step: 80 ms at 24 kHz


class Kind(IntEnum):
    HANDSHAKE = 0x00
    AUDIO = 0x01
    TEXT = 0x02
    CONTROL = 0x03
    METADATA = 0x04
    ERROR = 0x05
    PING = 0x06


class Control(IntEnum):
    START = 0x00
    END_TURN = 0x01
    PAUSE = 0x02
    RESTART = 0x03


class CloseCode(IntEnum):
    NORMAL = 1000
    POLICY = 1008  # malformed input the session cannot go on with
    TRY_AGAIN = 1013  # the server ended the session itself (shutting down): come back later
    INTERNAL = 1011
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    NOT_FOUND = 4404
    UNREAD = 4413  # the client left too many messages unread (its outbound queue is full)
    UNPROCESSABLE = 4422
    TOO_MANY = 4429  # an API key over one of its limits (the reason says which, and when again)


HANDSHAKE = bytes([Kind.HANDSHAKE]) + struct.pack("<II", PROTOCOL_VERSION, MODEL_VERSION)
PONG = bytes([Kind.PING])


class MalformedMessage(ValueError):
    """A client message the protocol does not allow; answered with an 0x05 error."""


# -1: a random seed, as the web clients mean it
Seed = Annotated[int, msgspec.Meta(ge=-1, le=2**63 - 1)]


class DuplexParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The query string of `GET /duplex` and `GET /api/chat`, named as the Moshi and
    PersonaPlex clients name it. Every field is optional: Kyutai's Python client sends none."""

    speaker: str | None = None
    # PersonaPlex's voice file name (`NATF0.pt`): the voice named by its stem, case-insensitive.
    voice_prompt: str | None = None
    text_prompt: str | None = None  # PersonaPlex's system prompt; "" for none
    seed: Seed | None = None
    text_seed: Seed | None = None  # the text stream's sampling; None: `seed`'s
    audio_seed: Seed | None = None
    # None: the route's default (pcm16 on /duplex, opus on /api/chat).
    encoding: Literal["pcm16", "opus"] | None = None
    api_key: str | None = None  # browsers cannot set headers on a WebSocket
    # Sampling; None: the model's defaults. Temperature 0 is greedy (argmax); top-k 0 keeps
    # every token.
    text_temperature: float | None = None
    text_topk: int | None = None
    audio_temperature: float | None = None
    audio_topk: int | None = None
    repetition_penalty: float | None = None  # on the text tokens; 1: none
    repetition_penalty_context: int | None = None  # how many past text steps it looks at
    # Sent by NVIDIA's hosted PersonaPlex client when set; identity for their service, none for
    # ours: accepted and ignored (redacted in logs), so that client connects unchanged.
    worker_auth_id: str | None = None
    email: str | None = None
    pad_mult: float | None = None  # added to the padding token's logit: > 0 pauses more

    def sampling(self) -> SamplingParams:
        """The session's sampling; ValueError naming every value out of bounds."""
        default = SamplingParams()
        params = SamplingParams(
            text_temperature=_pick(self.text_temperature, default.text_temperature),
            audio_temperature=_pick(self.audio_temperature, default.audio_temperature),
            text_top_k=_pick(self.text_topk, default.text_top_k),
            audio_top_k=_pick(self.audio_topk, default.audio_top_k),
            repetition_penalty=_pick(self.repetition_penalty, default.repetition_penalty),
            repetition_context=_pick(self.repetition_penalty_context, default.repetition_context),
            pad_bias=_pick(self.pad_mult, default.pad_bias),
        )
        problems = params.problems()
        if problems:
            names = {
                "text_top_k": "text_topk",
                "audio_top_k": "audio_topk",
                "repetition_context": "repetition_penalty_context",
                "pad_bias": "pad_mult",
            }
            for old, new in names.items():
                problems = [p.replace(old, new) for p in problems]
            raise ValueError("; ".join(problems))
        return params

    def seeds(self) -> tuple[int | None, int | None, int | None]:
        """(seed, text_seed, audio_seed), -1 as None: a random seed."""
        return _seed(self.seed), _seed(self.text_seed), _seed(self.audio_seed)

    def voice_name(self) -> str | None:
        """The voice asked for: `speaker`, else `voice_prompt` without its file extension;
        ValueError when both name different voices."""
        prompt = None
        if self.voice_prompt is not None and self.voice_prompt.strip():
            prompt = PurePosixPath(self.voice_prompt.strip()).stem.lower()
        speaker = self.speaker.strip() if self.speaker is not None else None
        if speaker and prompt and speaker.lower() != prompt:
            raise ValueError(
                f"speaker {self.speaker!r} and voice_prompt {self.voice_prompt!r} name "
                "different voices; give one"
            )
        return speaker or prompt


def _seed(value: int | None) -> int | None:
    return None if value is None or value == -1 else value


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


class SessionInfo(msgspec.Struct, kw_only=True):
    """The 0x04 metadata message sent right after the handshake."""

    session_id: str
    model: str
    speaker: str
    encoding: str
    sample_rate: int = SAMPLE_RATE
    frame_samples: int = FRAME_SAMPLES


def message(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes([kind]) + payload


def text_message(text: str) -> bytes:
    return message(Kind.TEXT, text.encode("utf-8"))


def error_message(reason: str) -> bytes:
    return message(Kind.ERROR, reason.encode("utf-8"))


def metadata_message(info: SessionInfo) -> bytes:
    return message(Kind.METADATA, msgspec.json.encode(info))


def parse(data: bytes | str) -> tuple[Kind, bytes]:
    """A client message as (kind, payload); raises MalformedMessage with the reason."""
    if isinstance(data, str):
        raise MalformedMessage("text frames are not part of the protocol; send binary messages")
    if not data:
        raise MalformedMessage("empty message")
    try:
        kind = Kind(data[0])
    except ValueError as exc:
        raise MalformedMessage(f"unknown message kind 0x{data[0]:02x}") from exc
    if kind not in (Kind.AUDIO, Kind.CONTROL, Kind.PING):
        raise MalformedMessage(f"clients may not send {kind.name.lower()} (0x{kind:02x}) messages")
    payload = bytes(data[1:])
    if kind is Kind.CONTROL and (len(payload) != 1 or payload[0] not in set(Control)):
        raise MalformedMessage(
            "a control message is one byte: 0 start, 1 end turn, 2 pause, 3 restart"
        )
    return kind, payload
