"""Qwen3-TTS as the engine serves it: loaded once, with its adapter bank and baked voices."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from finetune.audio import load_audio
from finetune.config import QWEN3_CODE_PREDICTOR_TARGETS, QWEN3_TALKER_TARGETS
from finetune.families.qwen3_tts.bake import bake_into_model, check_slot, unbake_from_model
from finetune.families.qwen3_tts.checkpoint import LoadedQwen3TTS, load_qwen3_tts
from finetune.families.qwen3_tts.conditioning import (
    CloneMode,
    InstructUse,
    Reference,
    SpeakerSource,
    VoiceConditioning,
    instruct_use,
)
from finetune.families.qwen3_tts.languages import (
    FIRST_SPEAKER_ROW,
    WEIGHT_KEY,
    free_rows,
    occupied_rows,
    write_row,
)
from finetune.families.qwen3_tts.serving import (
    Qwen3BatchGenerator,
    Qwen3DecodeBatch,
    Qwen3Prompter,
    Row,
)
from finetune.families.qwen3_tts.vocoder_stream import StreamingVocoder, vocoder_batch_wanted
from finetune.identity import same_base, weights_identity

import mlx.core as mx
import msgspec
import numpy as np

from server.engine.bank import AdapterBank, read_adapter_files
from server.engine.family import (
    PackageConflict,
    PackageError,
    decode_package_fields,
    package_member,
)
from server.engine.requests import SpeakJob, Voicing

# An ICL reference's last frames a row's audio stream starts after (their audio dropped).
REFERENCE_CONTEXT_FRAMES = 25
DEFAULT_SLOT = 3000  # the official recipe's speaker row


class LanguageRowEntry(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    row: int = -1


class BaseRecord(msgspec.Struct, kw_only=True):
    identity: dict[str, Any] | None = None  # finetune.identity.weights_identity


class Qwen3PackageFields(msgspec.Struct, kw_only=True):
    """voice.json fields of a Qwen3-TTS package (beyond the shared ones)."""

    conditioning: dict[str, Any] | None = None  # VoiceConditioning.from_dict checks it
    language_rows: list[LanguageRowEntry] | None = None
    base_model: BaseRecord | None = None


@dataclass
class Qwen3Model:
    name: str
    loaded: LoadedQwen3TTS
    bank: AdapterBank
    prompter: Qwen3Prompter
    generator: Qwen3BatchGenerator
    vocoder: StreamingVocoder
    clone_cache: dict[str, mx.array] = field(default_factory=dict)
    reference_cache: dict[tuple[str, str], Reference] = field(default_factory=dict)
    original_rows: dict[int, np.ndarray] = field(default_factory=dict)
    # codec rows holding installed voices' new-language vectors -> the rows' original contents
    language_rows: dict[int, np.ndarray] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    batch_vocoder: bool = field(default_factory=vocoder_batch_wanted)
    family: str = "qwen3_tts"
    adapter_module: str = "talker"
    adapter_riders: tuple[str, ...] = (WEIGHT_KEY,)  # adapter tensors installed as rows, not banked

    @classmethod
    def load(cls, name: str, path: str, *, slots: int, max_rank: int, max_bytes: int) -> Qwen3Model:
        loaded = load_qwen3_tts(path, serving=True)
        bank = AdapterBank(
            loaded.model.talker,
            QWEN3_TALKER_TARGETS + QWEN3_CODE_PREDICTOR_TARGETS,
            slots=slots,
            max_rank=max_rank,
            max_bytes=max_bytes,
        )
        mx.eval(loaded.model.parameters())
        return cls(
            name=name,
            loaded=loaded,
            bank=bank,
            prompter=Qwen3Prompter(loaded.model),
            generator=Qwen3BatchGenerator(loaded.model, bank.set_rows),
            vocoder=StreamingVocoder(
                loaded.model.speech_tokenizer.decoder,
                loaded.model.speech_tokenizer.decode_upsample_rate,
            ),
            identity=weights_identity(loaded.path),
        )

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def sample_rate(self) -> int:
        return int(self.model.sample_rate)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.model.speech_tokenizer.decode_upsample_rate

    def builtin_speakers(self) -> list[str]:
        if self.instruct_use() == "design":  # no speakers: its one voice is the description
            return [self.name.lower()]
        return sorted((self.model.config.talker_config.spk_id or {}).keys())

    def languages(self) -> list[str]:
        return sorted(
            {str(k).lower() for k in (self.model.config.talker_config.codec_language_id or {})}
        )

    def instruct_use(self) -> InstructUse | None:
        return instruct_use(self.loaded.tts_model_type, self.loaded.config.get("tts_model_size"))

    # --- generation (the engine's SpeechModel surface) ------------------------------------
    def make_row(self, job: SpeakJob, *, slot: int) -> Row:
        v = job.voicing
        speaker = None
        reference = None
        source: SpeakerSource = "none"
        use = self.instruct_use()
        if job.instruct and use is None:
            raise ValueError(f"model {self.name} takes no instruct")
        if use == "design":
            if not job.instruct:
                raise ValueError(f"model {self.name} (VoiceDesign) needs an instruct")
        elif v.speaker_name is not None:
            speaker, source = self.prompter.speaker_vector(v.speaker_name), "baked"
        elif v.ref_clip is not None:
            speaker, source = self.clone_vector(v.ref_clip), "ref_clip"
            if v.ref_text is not None:
                reference = self.icl_reference(v.ref_clip, v.ref_text)
        # job.language is the request's language, else the voice's trained one (see app.py).
        voice = VoiceConditioning(speaker=source, language_rows=v.language_rows)
        cond = voice.utterance(job.language, v.speaker_name, job.instruct)
        return Row(
            prompt=self.prompter.prompt(job.text, cond, speaker, reference),
            sampling=job.sampling,
            seed=job.segment_seed,
            slot=slot,
            cancel=job.cancel,
            context=None if reference is None else reference.codes,
        )

    def run(self, rows: list[Row]) -> None:
        self.generator.run(rows)

    def open_batch(self) -> Qwen3DecodeBatch:
        return Qwen3DecodeBatch(self.generator)

    def decode_frames(self, parts: list[tuple[Row, int, int]]) -> list[np.ndarray]:
        """Each row's frames [start, end) through its own vocoder stream
        (finetune/families/qwen3_tts/vocoder_stream.py: the joined stream is the one-shot
        decode). An ICL row's stream starts after its reference's last
        REFERENCE_CONTEXT_FRAMES frames, their audio dropped; mlx-audio decodes after the
        whole reference (the decoder's cost would grow with it, on every segment).

        The rows of one call are decoded in one pass (`batch_vocoder`; the wide early stages
        batched, the narrow late ones row by row): 8 rows' chunks on the real 0.6B decoder took
        0.71x the time of a pass per row here (tests/bench/bench_vocoder.py). A row's audio
        then depends on its batch in the last float bits (within the stream's tolerance, never
        its frames); VOICEFOUNDRY_VOCODER_BATCH=0 decodes rows one by one, so a seeded
        request's audio is the same bytes in any batch."""
        streams = []
        for row, start, end in parts:
            if row.audio is None:
                lead = None if row.context is None else row.context[-REFERENCE_CONTEXT_FRAMES:]
                row.audio = self.vocoder.open(lead)
            if start != row.audio.frames_in or end < start:
                raise ValueError(f"frames [{start}, {end}) do not continue the row's audio")
            streams.append((row.audio, np.stack(row.frames[start:end])))
        if self.batch_vocoder:
            return self.vocoder.decode(streams)
        return [self.vocoder.decode([stream])[0] for stream in streams]

    def debug_record(self, row: Row) -> dict[str, Any]:
        return {"prompt": np.asarray(row.prompt.astype(mx.float32)).tolist()}

    def forget(self, voicing: Voicing) -> None:
        if voicing.ref_clip is not None:
            self.clone_cache.pop(str(voicing.ref_clip), None)
            self.reference_cache.pop((str(voicing.ref_clip), voicing.ref_text or ""), None)

    # --- voice packages (server/voices.py `_install`; see SpeechModel) -----------------------
    def package_fields(self, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """The voice's conditioning and new-language rows; refuses a package trained on
        another base (other weights, or the same weights quantised otherwise)."""
        package = decode_package_fields(meta, Qwen3PackageFields)
        recorded = package.base_model.identity if package.base_model is not None else None
        if recorded is not None:  # packages from before identities were recorded: unverified
            problems = same_base(recorded, self.identity)
            if problems:
                raise PackageConflict(
                    f"the voice was trained on another base than model {self.name!r}: "
                    + "; ".join(problems)
                )
        legacy = {
            "speaker": "baked" if meta.get("embedding") else "ref_clip",
            "language": meta.get("language"),
        }
        try:
            conditioning = VoiceConditioning.from_dict(meta.get("conditioning") or legacy)
        except ValueError as exc:
            raise PackageError(f"voice.json {exc}") from exc
        if conditioning.speaker == "ref_clip" and not package_member(folder, "ref.wav").is_file():
            raise PackageError(
                "the voice was trained on a reference clip's speaker vector: the package needs "
                "it as ref.wav (or send one as 'ref')"
            )
        return {
            "conditioning": conditioning,
            "base_verified": recorded is not None,
            "language_rows": self._package_language_rows(folder, meta),
        }

    def _package_language_rows(
        self, folder: Path, meta: dict[str, Any]
    ) -> list[tuple[str, int, np.ndarray]]:
        package = decode_package_fields(meta, Qwen3PackageFields)
        entries = package.language_rows or []
        if not entries:
            return []
        if not meta.get("adapter"):
            raise PackageError("voice.json names language_rows but the package has no adapter")
        _, weights = read_adapter_files(package_member(folder, meta["adapter"]))
        vectors = weights.get(WEIGHT_KEY)
        width = self.model.talker.model.codec_embedding.weight.shape[1]
        if vectors is None or tuple(vectors.shape) != (len(entries), width):
            raise PackageError(
                f"the adapter's {WEIGHT_KEY} must be [{len(entries)}, {width}] for the "
                f"{len(entries)} language row(s) voice.json names"
            )
        if not np.isfinite(vectors).all():
            raise PackageError(f"the adapter's {WEIGHT_KEY} holds values that are not finite")
        return [(e.name.lower(), e.row, np.asarray(vectors[i])) for i, e in enumerate(entries)]

    def check_package(self, folder: Path, fields: dict[str, Any]) -> None:
        """Install the voice's language rows (rolled back by `release_package`), at the rows
        the registry reserved for them when it did."""
        rows = fields.get("language_rows") or []
        reserved = fields.get("reserved_rows")
        if reserved is not None:
            placed = [(n, r, v) for (n, _, v), r in zip(rows, reserved, strict=True)]
            fields["installed_rows"] = self.install_language_rows(placed, exact=True)
        else:
            fields["installed_rows"] = self.install_language_rows(rows)

    def extra_rows(self, fields: dict[str, Any]) -> int:
        return len(fields.get("language_rows") or [])

    def free_extra_rows(self, fields: dict[str, Any], taken: set[int]) -> list[int] | None:
        """Each new language at its trained row when that is free here and in the registry,
        else at the next free row of the languages' region."""
        talker = self.model.config.talker_config
        busy = set(taken) | occupied_rows(talker) | set(self.language_rows)
        chosen: list[int] = []
        for _, wanted, _ in fields.get("language_rows") or []:
            if FIRST_SPEAKER_ROW <= wanted < talker.vocab_size and wanted not in busy:
                row = wanted
            else:
                try:
                    row = free_rows(talker, 1, also_taken=busy)[0]
                except ValueError:
                    return None
            busy.add(row)
            chosen.append(row)
        return chosen

    def release_package(self, fields: dict[str, Any]) -> None:
        self.release_language_rows(fields.get("installed_rows", []))

    def package_files(self, fields: dict[str, Any]) -> list[str]:
        return []  # its adapter, embedding and ref.wav are the shared voice.json fields

    def registry_meta(self, fields: dict[str, Any], stored_at: Path) -> dict[str, Any]:
        return {
            "conditioning": fields["conditioning"].to_dict(),
            "base_verified": fields["base_verified"],
            "language_rows": [{"name": n, "row": r} for n, r in fields.get("installed_rows", [])],
        }

    # --- new-language rows -------------------------------------------------------------------
    def install_language_rows(
        self, rows: list[tuple[str, int, np.ndarray]], *, exact: bool = False
    ) -> list[tuple[str, int]]:
        """Write each row, at its trained row if free (always, with `exact`), else at another
        free row: rows are per voice, so two voices can bring their own Hindi."""
        installed: list[tuple[str, int]] = []
        talker = self.model.config.talker_config
        try:
            for name, wanted, vector in rows:
                taken = occupied_rows(talker) | set(self.language_rows)
                free = FIRST_SPEAKER_ROW <= wanted < talker.vocab_size and wanted not in taken
                row = wanted if exact or free else free_rows(talker, 1, also_taken=taken)[0]
                self.language_rows[row] = write_row(self.model, row, vector)
                installed.append((name, row))
        except BaseException:
            self.release_language_rows(installed)
            raise
        return installed

    def release_language_rows(self, rows: list[tuple[str, int]] | list[dict[str, Any]]) -> None:
        for entry in rows:
            row = int(entry["row"] if isinstance(entry, dict) else entry[1])
            previous = self.language_rows.pop(row, None)
            if previous is not None:
                write_row(self.model, row, previous)

    def free_speaker_slot(self, wanted: int, taken: set[int]) -> int | None:
        """A codec row for a baked speaker: `wanted` if free, else the first free one from 3000
        up, then from 2048 up (rows below 2048 are audio codes); None when all are taken."""
        talker = self.model.config.talker_config
        taken = taken | occupied_rows(talker) | set(self.language_rows)
        order = [
            wanted,
            *range(DEFAULT_SLOT, talker.vocab_size),
            *range(FIRST_SPEAKER_ROW, DEFAULT_SLOT),
        ]
        return next(
            (r for r in order if FIRST_SPEAKER_ROW <= r < talker.vocab_size and r not in taken),
            None,
        )

    def restore_voice(self, meta: dict[str, Any], folder: Path) -> None:
        """At start: a registered voice's new-language rows, at the rows it was given."""
        entries = meta.get("language_rows") or []
        if not entries:
            return
        package = json.loads((folder / "voice.json").read_text())
        trained = self._package_language_rows(folder, package)
        vectors = {name: vector for name, _, vector in trained}
        self.install_language_rows(
            [(e["name"], int(e["row"]), vectors[e["name"]]) for e in entries], exact=True
        )

    def release_voice(self, meta: dict[str, Any]) -> None:
        self.release_language_rows(meta.get("language_rows") or [])

    # --- voices ------------------------------------------------------------------------------
    def clone_vector(self, ref_clip: Path) -> mx.array:
        key = str(ref_clip)
        if key not in self.clone_cache:
            if self.model.speaker_encoder is None:
                raise ValueError(f"model {self.name} has no speaker encoder to clone with")
            wav = load_audio(ref_clip, 24_000)
            self.clone_cache[key] = self.model.extract_speaker_embedding(mx.array(wav))[0]
        return self.clone_cache[key]

    def icl_reference(self, ref_clip: Path, ref_text: str) -> Reference:
        key = (str(ref_clip), ref_text)
        if key not in self.reference_cache:
            wav = load_audio(ref_clip, 24_000)
            self.reference_cache[key] = self.prompter.reference(wav, ref_text)
        return self.reference_cache[key]

    def prepare_clone(self, ref_clip: Path, ref_text: str | None = None) -> CloneMode:
        """The x-vector always (the official ICL prompt carries it too); with a transcript, the
        in-context reference as well."""
        self.clone_vector(ref_clip)
        if ref_text is None:
            return "x_vector"
        self.icl_reference(ref_clip, ref_text)
        return "icl"

    def bake(self, name: str, slot: int, embedding: np.ndarray) -> None:
        width = self.model.talker.model.codec_embedding.weight.shape[1]
        if embedding.shape != (width,) or not np.isfinite(embedding).all():
            raise PackageError(
                f"the speaker embedding must be {width} finite numbers (has shape "
                f"{tuple(embedding.shape)})"
            )
        check_slot(self.model, name, slot, force=False)
        weight = self.model.talker.model.codec_embedding.weight
        self.original_rows.setdefault(slot, np.array(weight[slot]))
        bake_into_model(self.model, name, slot, embedding)

    def unbake(self, name: str) -> None:
        spk_id = self.model.config.talker_config.spk_id or {}
        if name not in spk_id:
            return
        slot = int(spk_id[name])
        original = self.original_rows.pop(slot, None)
        if original is None:
            original = np.zeros(self.model.talker.model.codec_embedding.weight.shape[1], np.float32)
        unbake_from_model(self.model, name, original)
