"""Sesame CSM as the engine serves it: the family's own frame loop, an adapter bank, Mimi audio.

Speakers are integer ids. Each CSM model serves builtin voices named `<model>-<id>` for the ids
in BUILTIN_SPEAKER_IDS (Sesame's own examples talk as speakers 0 and 1); a registered CSM voice
names its id, an optional adapter and optional context clips (audio + transcript) that are
prepended to every prompt, as Sesame's conversation context.

The rows of a batch run in one forward per frame (`finetune.families.csm.batch`): each row is
prefilled alone on its own backbone caches, then every step runs the depth decoder for all rows
at once and feeds their frames through the backbone in one batched pass, with one adapter-bank
slot per row and one sampler (PRNG key) per row, so a row makes the frames it makes alone. A
row leaves when its frame is EOS, at its max_tokens or when cancelled; the others go on. Each
frame is decoded at once by Mimi's streaming decoder through the row's own decoder state
(`mimi_rows`), which is exactly what the family's `synthesize` / `stream_audio` compute: a
streamed request gets the same samples as a whole one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from finetune.audio import load_audio
from finetune.families.csm.batch import CsmBatchGenerator, CsmStream
from finetune.families.csm.checkpoint import LoadedCsm, load_csm
from finetune.families.csm.family import ADAPTER_MODULE, CSM_BACKBONE_TARGETS, CSM_DECODER_TARGETS
from finetune.families.csm.family import FAMILY as CSM_FAMILY
from finetune.families.csm.generate import (
    MAX_SEQUENCE,
    ContextClip,
    Frames,
    FrameSampler,
    GenerationError,
    encode_audio,
    prompt_frames,
)
from finetune.families.csm.mimi_rows import MimiRowDecoders, MimiRowState

import mlx.core as mx
import msgspec
import numpy as np

from server.engine.bank import AdapterBank
from server.engine.family import (
    PackageError,
    check_package_path,
    decode_package_fields,
    package_file,
    package_member,
)
from server.engine.requests import Sampling, SpeakJob, Voicing

FAMILY = CSM_FAMILY.name
BUILTIN_SPEAKER_IDS = (0, 1)
FRAME_RATE = 12.5  # Mimi frames per second


class CsmContextClip(msgspec.Struct, kw_only=True):
    audio: str  # an audio file of the package
    text: str  # its transcript

    def __post_init__(self) -> None:
        check_package_path("context audio", self.audio)
        if not self.text.strip():
            raise ValueError(f"context clip {self.audio!r} needs its transcript as 'text'")


class CsmPackageFields(msgspec.Struct, kw_only=True):
    """voice.json fields of a CSM package (beyond the shared ones)."""

    speaker_id: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    context: list[CsmContextClip] | None = None


@dataclass
class CsmRow:
    """One request's segment: what to say, as whom, and the frames + audio made so far."""

    prompt: Frames
    sampling: Sampling
    seed: int | None
    slot: int
    cancel: threading.Event
    on_frames: Callable[[np.ndarray], None] | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    pcm: list[np.ndarray] = field(default_factory=list)  # one decoded chunk per frame


@dataclass
class _Live:
    """A row inside `run`: its generation stream and its own Mimi decoder state."""

    row: CsmRow
    stream: CsmStream
    audio: MimiRowState


@dataclass
class CsmModel:
    name: str
    loaded: LoadedCsm
    bank: AdapterBank
    generator: CsmBatchGenerator
    mimi: MimiRowDecoders
    context_codes: dict[str, np.ndarray] = field(default_factory=dict)  # clip path -> codes
    family: str = FAMILY
    adapter_module: str = ADAPTER_MODULE
    adapter_riders: tuple[str, ...] = ()

    @classmethod
    def load(cls, name: str, path: str, *, slots: int, max_rank: int, max_bytes: int) -> CsmModel:
        loaded = load_csm(path, serving=True)
        bank = AdapterBank(
            loaded.backbone,
            list(CSM_BACKBONE_TARGETS) + list(CSM_DECODER_TARGETS),
            slots=slots,
            max_rank=max_rank,
            max_bytes=max_bytes,
        )
        mx.eval(loaded.model.parameters())
        return cls(
            name=name,
            loaded=loaded,
            bank=bank,
            generator=CsmBatchGenerator(loaded, bank.set_rows),
            mimi=MimiRowDecoders(loaded.model._streaming_decoder._mimi),
        )

    @property
    def sample_rate(self) -> int:
        return int(self.loaded.sample_rate)

    @property
    def frame_rate(self) -> float:
        return FRAME_RATE

    def builtin_speakers(self) -> list[str]:
        return [builtin_name(self.name, i) for i in BUILTIN_SPEAKER_IDS]

    def languages(self) -> list[str]:
        return []  # CSM has no language ids

    def instruct_use(self) -> str | None:
        return None  # CSM takes no instructions

    def speaker_of(self, voicing: Voicing) -> int:
        if voicing.speaker_id is not None:
            return int(voicing.speaker_id)
        names = {builtin_name(self.name, i): i for i in BUILTIN_SPEAKER_IDS}
        if voicing.speaker_name is not None and voicing.speaker_name.lower() in names:
            return names[voicing.speaker_name.lower()]
        if voicing.ref_clip is not None:
            raise GenerationError(
                f"model {self.name} (CSM) cannot clone from a clip alone: a CSM voice needs "
                "context clips with their transcripts"
            )
        raise GenerationError(f"model {self.name} (CSM) has no speaker {voicing.speaker_name!r}")

    # --- generation (the engine's SpeechModel surface) ------------------------------------
    def make_row(self, job: SpeakJob, *, slot: int) -> CsmRow:
        voicing = job.voicing
        speaker = self.speaker_of(voicing)
        context = tuple(self._context_clip(c.audio, c.text, speaker) for c in voicing.context)
        # Checked here so a prompt that cannot be served fails its own request only.
        prompt = prompt_frames(self.loaded, job.text, speaker, context)
        frames = job.sampling.max_tokens
        if len(prompt) + frames > MAX_SEQUENCE:
            raise GenerationError(
                f"prompt of {len(prompt)} frames + {frames} audio frames exceeds the model's "
                f"{MAX_SEQUENCE}-frame window: shorten the text, the context or max_tokens"
            )
        return CsmRow(
            prompt=prompt,
            sampling=job.sampling,
            seed=job.segment_seed,
            slot=slot,
            cancel=job.cancel,
        )

    def run(self, rows: list[CsmRow]) -> None:
        """Every row to its end, one batched step per frame; a row ends alone (EOS, its
        max_tokens, or cancelled) and the others go on."""
        batch = self.open_batch()
        try:
            batch.admit(rows)
            while batch.rows:
                batch.step()
        finally:
            batch.close()

    def open_batch(self) -> CsmDecodeBatch:
        """A running batch rows join between steps (iteration-level scheduling)."""
        return CsmDecodeBatch(self)

    def _start(self, row: CsmRow) -> _Live:
        sampler = FrameSampler(row.seed, row.sampling.temperature, row.sampling.top_k)
        stream = self.generator.start(
            row.prompt, sampler, max_frames=row.sampling.max_tokens, slot=row.slot
        )
        return _Live(row, stream, self.mimi.new())

    def _record(self, live: list[_Live], codes: np.ndarray) -> None:
        """Decode each row's new frame through its own Mimi state, then tell the engine."""
        made = []
        for entry, frame in zip(live, codes, strict=True):
            if frame.any() and not entry.row.cancel.is_set():
                made.append((entry.row, frame, self.mimi.decode(entry.audio, frame)))
        mx.eval([pcm for _, _, pcm in made])
        for row, frame, pcm in made:
            row.frames.append(frame)
            row.pcm.append(np.asarray(pcm, np.float32))
            if row.on_frames is not None:
                row.on_frames(frame[None])

    def decode_frames(self, parts: list[tuple[CsmRow, int, int]]) -> list[np.ndarray]:
        """Each frame was decoded through its row's own Mimi state as it was made."""
        return [_join(row.pcm[start:end]) for row, start, end in parts]

    def debug_record(self, row: CsmRow) -> dict[str, Any]:
        return {}

    def forget(self, voicing: Voicing) -> None:
        for clip in voicing.context:
            self.context_codes.pop(str(clip.audio), None)

    # --- voices ------------------------------------------------------------------------------
    def context_codes_of(self, audio: Path) -> np.ndarray:
        """A context clip's Mimi codes, encoded once per clip file."""
        key = str(audio)
        if key not in self.context_codes:
            wav = load_audio(Path(audio), self.sample_rate)
            self.context_codes[key] = encode_audio(self.loaded, wav)
        return self.context_codes[key]

    def _context_clip(self, audio: Path, text: str, speaker: int) -> ContextClip:
        return ContextClip(text=text, speaker=speaker, codes=self.context_codes_of(audio))

    # --- voice packages ----------------------------------------------------------------------
    def package_fields(self, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """A CSM package's speaker id and context clips (files of the package), checked."""
        package = decode_package_fields(meta, CsmPackageFields)
        context = []
        for clip in package.context or []:
            package_file(folder, clip.audio, "context audio")
            context.append({"audio": clip.audio, "text": clip.text})
        return {"speaker_id": package.speaker_id, "context": context}

    def package_files(self, fields: dict[str, Any]) -> list[str]:
        return [clip["audio"] for clip in fields["context"]]

    def extra_rows(self, fields: dict[str, Any]) -> int:
        return 0  # a CSM voice takes no codec rows

    def free_extra_rows(self, fields: dict[str, Any], taken: set[int]) -> list[int] | None:
        return []

    def check_package(self, folder: Path, fields: dict[str, Any]) -> None:
        """Encode each context clip once (on the engine thread) to prove it loads."""
        for clip in fields["context"]:
            path = package_member(folder, clip["audio"])
            try:
                self.context_codes_of(path)
            except Exception as exc:  # undecodable audio: the package's fault
                raise PackageError(  # the type only: the message names the staging path
                    f"CSM context clip {clip['audio']!r} cannot be used ({type(exc).__name__})"
                ) from exc
            finally:
                self.context_codes.pop(str(path), None)

    def release_package(self, fields: dict[str, Any]) -> None:
        return None  # check_package installs nothing

    def free_speaker_slot(self, wanted: int, taken: set[int]) -> int | None:
        return None  # CSM voices are speaker ids + context clips, never baked rows

    def restore_voice(self, meta: dict[str, Any], folder: Path) -> None:
        return None

    def release_voice(self, meta: dict[str, Any]) -> None:
        return None

    def bake(self, name: str, slot: int, embedding: np.ndarray) -> None:
        raise PackageError("CSM has no speaker rows to bake an embedding into")

    def unbake(self, name: str) -> None:
        return None

    def prepare_clone(self, ref_clip: Path, ref_text: str | None = None) -> str:
        raise ValueError(
            f"model {self.name} clones no voice from a clip: CSM voices are fine-tuned speakers"
        )

    def registry_meta(self, fields: dict[str, Any], stored_at: Path) -> dict[str, Any]:
        """The CSM fields as the registry keeps them: clip paths relative to the data dir."""
        context = [
            {"audio": str(stored_at / c["audio"]), "text": c["text"]} for c in fields["context"]
        ]
        return {"speaker_id": fields["speaker_id"], "context": context}


class CsmDecodeBatch:
    """The model's running rows: admitted (prefilled alone) between steps, one batched
    forward per step, leaving when they end."""

    def __init__(self, model: CsmModel) -> None:
        self.model = model
        self.rows: list[CsmRow] = []
        self._live: list[_Live] = []

    def admit(self, rows: list[CsmRow]) -> None:
        for row in rows:
            if not row.cancel.is_set():
                self._live.append(self.model._start(row))
        self.rows = [entry.row for entry in self._live]

    def step(self) -> list[CsmRow]:
        """One frame of every running row; the rows that ended (EOS, max_tokens, cancel)."""
        generator = self.model.generator
        for entry in self._live:
            if entry.row.cancel.is_set():
                generator.stop(entry.stream)
        live = [entry for entry in self._live if not entry.stream.done]
        if live:
            codes = generator.step([entry.stream for entry in live])
            self.model._record(live, codes)
        ended = [entry.row for entry in self._live if entry.stream.done]
        self._live = [entry for entry in live if not entry.stream.done]
        self.rows = [entry.row for entry in self._live]
        return ended

    def close(self) -> None:
        for entry in self._live:
            self.model.generator.stop(entry.stream)
        self._live, self.rows = [], []
        self.model.generator.release()


def builtin_name(model: str, speaker_id: int) -> str:
    return f"{model.lower()}-{speaker_id}"


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
