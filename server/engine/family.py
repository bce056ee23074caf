"""The surface every served speech family implements, and loading a model by its family.

The engine (server/engine/worker.py) knows only this surface: it asks a model for one row per
request and segment, runs a batch of rows, and asks for audio (streamed ranges, or the whole
segment). Everything about prompts, sampling and codecs stays inside the family's module.

Which families the speech engine serves, and by which class, comes from the family registry
(`finetune.families.FAMILIES`: `Family.engine` and `Family.served_by`); `served_class` imports
the model class of any family, whichever engine serves it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

from finetune.families import FAMILIES, get_family

import msgspec
import numpy as np

from server.engine.bank import AdapterBank
from server.engine.requests import SpeakJob, Voicing

SPEECH_ENGINE = "speech"
T = TypeVar("T")


def speech_families() -> dict[str, str]:
    """Family name -> "module:Class" of its SpeechModel, for the families /speak serves."""
    return {f.name: f.served_by for f in FAMILIES.values() if f.engine == SPEECH_ENGINE}


class PackageError(ValueError):
    """A voice package the model cannot take; `status` is the HTTP status the service answers."""

    status = 422


class PackageConflict(PackageError):
    """A voice package that does not fit the loaded model (e.g. trained on another base)."""

    status = 409


class PackageMalformed(PackageError):
    """A voice package that is not a well-formed package (e.g. a path escaping it)."""

    status = 400


def package_member(folder: Path, name: str) -> Path:
    """`folder / name`, refusing a name that escapes `folder`."""
    root = Path(folder).resolve()
    target = (root / name).resolve()
    if root != target and root not in target.parents:
        raise PackageMalformed(f"voice package path escapes the package: {name}")
    return target


def check_package_path(field: str, name: str) -> str:
    """A path voice.json names: a plain relative name inside the package (ValueError if not,
    before anything looks at the file system, so the answer never depends on what exists)."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts or "\x00" in name or "\\" in name:
        raise ValueError(f"{field} must be a relative file name inside the package, not {name!r}")
    return name


def package_file(folder: Path, name: str, field: str) -> Path:
    """The file voice.json names as `field`: confined to the package, and there."""
    path = package_member(folder, name)
    if not path.is_file():
        raise PackageError(f"voice.json {field} {name!r} is not a file of the package")
    return path


def decode_package_fields(meta: dict[str, Any], kind: type[T]) -> T:
    """The voice.json fields `kind` (a msgspec Struct) declares, or a PackageError naming what
    is wrong (types, bounds, paths)."""
    try:
        return msgspec.convert(meta, kind)
    except msgspec.ValidationError as exc:
        raise PackageError(f"voice.json: {exc}") from exc


class SpeechRow(Protocol):
    """One request's current segment inside a batch.

    The family appends each generated frame to `frames` and then calls `on_frames` (set by the
    engine when streaming) with that frame; it stops a row whose `cancel` is set.
    """

    slot: int
    cancel: threading.Event
    frames: list[np.ndarray]
    on_frames: Callable[[np.ndarray], None] | None


class DecodeBatch(Protocol):
    """A model's running batch under iteration-level scheduling (`open_batch`): rows join
    between decode steps and leave when they end."""

    rows: list[Any]

    def admit(self, rows: list[Any]) -> None:
        """Prefill `rows` and add them to the running ones (cancelled rows are left out)."""
        ...

    def step(self) -> list[Any]:
        """One decode step of every running row; the rows that ended, no longer running."""
        ...

    def close(self) -> None:
        """Drop every row (and what they selected, e.g. adapter rows)."""
        ...


class SpeechModel(Protocol):
    name: str
    family: str
    loaded: Any  # the family's loaded checkpoint; `.path` is where it came from
    bank: AdapterBank
    adapter_module: str  # what an adapter_config.json's "module" must say to fit the bank
    adapter_riders: tuple[str, ...]  # adapter tensors the model installs itself, not banked

    @property
    def sample_rate(self) -> int: ...

    @property
    def frame_rate(self) -> float: ...

    def builtin_speakers(self) -> list[str]:
        """Speaker names the checkpoint itself serves (lower case)."""
        ...

    def languages(self) -> list[str]:
        """Language names a request's `language` conditions on (lower case; [] for none)."""
        ...

    def instruct_use(self) -> str | None:
        """What a request's `instruct` does on this model: "style" (how its speakers speak) or
        "design" (the voice itself, described: the request must send one); None: it takes
        none (the server refuses an instruct before it reaches `make_row`)."""
        ...

    def make_row(self, job: SpeakJob, *, slot: int) -> SpeechRow:
        """A row for `job.text` in `job.voicing`'s voice, seeded with `job.segment_seed`,
        using adapter-bank slot `slot` (0 = none). Raises for a voice the model cannot make."""
        ...

    def run(self, rows: list[SpeechRow]) -> None:
        """Generate every row until it ends, hits its frame budget, or is cancelled."""
        ...

    def open_batch(self) -> DecodeBatch:
        """A new, empty running batch: the continuous scheduler (server/engine/worker.py) admits
        rows into it and steps it."""
        ...

    def decode_frames(self, parts: list[tuple[SpeechRow, int, int]]) -> list[np.ndarray]:
        """Audio of frames [start, end) of each row, continuing the row's audio stream: a
        row's calls come with consecutive ranges from 0, as its frames are made, and join
        into its whole audio (a non-streaming response is that join). The rows of one call
        are decoded together where the family can. A call that raises leaves every row's
        stream as it was (the engine then decodes the rows one by one)."""
        ...

    def forget(self, voicing: Voicing) -> None:
        """Drop whatever the model cached for this voice (clone vectors, encoded context)."""
        ...

    def debug_record(self, row: SpeechRow) -> dict[str, Any]:
        """What conditioned `row` (e.g. its prompt), for the `codes_log` debugging aid."""
        ...

    # --- voice packages (server/voices.py `_install`) -----------------------------------------
    def package_fields(self, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """The family-specific fields of a staged package's voice.json, checked against the
        package (paths relative to `folder`). Raises PackageError / PackageConflict."""
        ...

    def package_files(self, fields: dict[str, Any]) -> list[str]:
        """The files of the package `fields` name beyond the shared voice.json fields (adapter,
        embedding, ref.wav): anything else the package holds is refused."""
        ...

    def check_package(self, folder: Path, fields: dict[str, Any]) -> None:
        """On the engine thread, before the voice is registered: prove `fields` work on this
        model (e.g. decode context clips). Raises PackageError."""
        ...

    def registry_meta(self, fields: dict[str, Any], stored_at: Path) -> dict[str, Any]:
        """What the registry's `Voice.meta` keeps of `fields` once the package lives at
        `stored_at` (relative to the data directory)."""
        ...

    def release_package(self, fields: dict[str, Any]) -> None:
        """Undo `check_package` (the voice did not get registered after all)."""
        ...

    def free_speaker_slot(self, wanted: int, taken: set[int]) -> int | None:
        """A free row for a baked speaker embedding (`wanted` if free), or None."""
        ...

    def extra_rows(self, fields: dict[str, Any]) -> int:
        """How many rows beyond its speaker slot the package's voice takes (e.g. new-language
        rows); the server reserves them in the registry, so replicas never share one."""
        ...

    def free_extra_rows(self, fields: dict[str, Any], taken: set[int]) -> list[int] | None:
        """`extra_rows(fields)` free rows, none of `taken` (rows the registry knows are held);
        None when there are too few. The ones reserved reach `check_package` as
        `fields["reserved_rows"]`."""
        ...

    def restore_voice(self, meta: dict[str, Any], folder: Path) -> None:
        """At start, on the engine thread: put back what a registered voice installs into the
        model (beyond its baked row), from its registry `meta` and package `folder`."""
        ...

    def release_voice(self, meta: dict[str, Any]) -> None:
        """On delete, on the engine thread: free what `restore_voice` / `check_package` took."""
        ...

    # --- speaker rows and clones (on the engine thread) -----------------------------------------
    def bake(self, name: str, slot: int, embedding: np.ndarray) -> None:
        """Write `embedding` as speaker `name` into row `slot`. Raises PackageError where the
        model has no such rows (`free_speaker_slot` then never offers one)."""
        ...

    def unbake(self, name: str) -> None:
        """Undo `bake` (nothing if `name` was never baked)."""
        ...

    def prepare_clone(self, ref_clip: Path, ref_text: str | None = None) -> str:
        """Prove `ref_clip` makes a voice of this model and cache what serving it needs; with
        its transcript `ref_text`, for the in-context path. Returns how the voice is cloned
        (e.g. "icl", "x_vector"), for the voice's meta. Raises ValueError where the model
        cannot clone (that way)."""
        ...


@dataclass(frozen=True)
class BankLimits:
    slots: int
    max_rank: int
    max_bytes: int


def serves_family(family: str) -> bool:
    return family in speech_families()


def served_class(family: str) -> Any:
    """The server-side model class of `family` (any engine), imported on first use."""
    module, _, cls = get_family(family).served_by.partition(":")
    return getattr(importlib.import_module(module), cls)


def speech_model_class(family: str) -> Any:
    if not serves_family(family):
        raise ValueError(
            f"model family {family!r} is not served by the speech engine; "
            f"served: {', '.join(sorted(speech_families()))}"
        )
    return served_class(family)


def load_speech_model(name: str, family: str, path: str | Path, limits: BankLimits) -> SpeechModel:
    """Load a checkpoint of `family` for serving (runs on the engine's MLX thread)."""
    return _load(speech_model_class(family), name, path, limits)


def load_served_model(name: str, family: str, path: str | Path, limits: BankLimits) -> Any:
    """Load a checkpoint of `family` for whichever engine serves it (on that engine's thread)."""
    return _load(served_class(family), name, path, limits)


def _load(cls: Any, name: str, path: str | Path, limits: BankLimits) -> Any:
    return cls.load(
        name, str(path), slots=limits.slots, max_rank=limits.max_rank, max_bytes=limits.max_bytes
    )
