"""A staged voice package's voice.json, decoded and checked before anything it names is read.

The fields every family's package shares are decoded against `PackageMeta` (wrong types, paths
that are not plain names inside the package: 422); each family decodes its own fields in its
`package_fields`. `stray_files` finds what a package holds that its voice.json does not name.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from finetune.families import FAMILIES
from finetune.families.qwen3_tts.bake import PACKAGE_FORMAT
from finetune.lora import AdapterError

import msgspec

from server.engine.family import PackageError, check_package_path, package_member
from server.errors import BadRequest, Conflict, Unprocessable

META_FILE = "voice.json"
MAX_META_BYTES = 1 << 20  # voice.json and adapter_config.json are read whole
# What archivers add beside the files (macOS resource forks, Finder metadata): dropped, not refused.
_ARCHIVER_LITTER = ("__MACOSX",)


class PackageMeta(msgspec.Struct, kw_only=True):
    """voice.json fields shared by every family (a family's own fields are decoded by it)."""

    format: str
    family: str
    name: str | None = None
    adapter: str | None = None  # a folder of the package
    embedding: str | None = None  # a file of the package
    slot: Annotated[int, msgspec.Meta(ge=0)] | None = None
    language: str | None = None
    strategy: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        for field in ("adapter", "embedding"):
            value = getattr(self, field)
            if value is not None:
                check_package_path(field, value)


def read_meta(folder: Path) -> tuple[PackageMeta, dict[str, Any]]:
    """voice.json of the package staged at `folder`: the shared fields, and the whole object."""
    file = folder / META_FILE
    if not file.is_file():
        raise Unprocessable(f"voice package has no {META_FILE}")
    if file.stat().st_size > MAX_META_BYTES:
        raise Unprocessable(f"{META_FILE} is larger than {MAX_META_BYTES} bytes")
    try:
        raw = msgspec.json.decode(file.read_bytes())
    except msgspec.DecodeError as exc:
        raise Unprocessable(f"{META_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise Unprocessable(f"{META_FILE} must hold a JSON object, not {type(raw).__name__}")
    if raw.get("format") != PACKAGE_FORMAT:
        raise Unprocessable(f"{META_FILE} format must be {PACKAGE_FORMAT!r}")
    family = raw.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise Unprocessable(f"voice package family {family!r} is not served")
    try:
        meta = msgspec.convert(raw, PackageMeta)
    except msgspec.ValidationError as exc:
        raise Unprocessable(f"{META_FILE}: {exc}") from exc
    return meta, raw


def stray_files(folder: Path, named: list[Path]) -> list[str]:
    """Files under `folder` that are neither `named` nor inside a named folder (archiver litter
    is removed instead)."""
    root = folder.resolve()
    keep = {p.resolve() for p in named}
    strays = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in _ARCHIVER_LITTER or rel.name.startswith("._") or rel.name == ".DS_Store":
            if path.is_file():
                path.unlink()
            continue
        if path.is_dir() or path in keep or any(k in path.parents for k in keep):
            continue
        strays.append(str(rel))
    for litter in _ARCHIVER_LITTER:
        if (root / litter).is_dir():
            shutil.rmtree(root / litter, ignore_errors=True)
    return strays


def refuse_strays(folder: Path, named: list[Path]) -> None:
    """A package holding files its voice.json does not name is refused (nothing is kept that
    the voice does not use)."""
    strays = stray_files(folder, named)
    if strays:
        shown = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        raise PackageError(f"voice package holds files its voice.json does not name: {shown}")


def package_folder(folder: Path, name: str) -> Path:
    """The folder voice.json names as its adapter: confined to the package, and there."""
    path = package_member(folder, name)
    if not path.is_dir():
        raise PackageError(f"voice.json adapter {name!r} is not a folder of the package")
    return path


@contextlib.contextmanager
def package_errors() -> Iterator[None]:
    """A model's PackageError as the service's 400 / 409 / 422 with the same message."""
    try:
        yield
    except PackageError as exc:
        error = {400: BadRequest, 409: Conflict}.get(exc.status, Unprocessable)
        raise error(str(exc)) from exc


@contextlib.contextmanager
def package_relative(adapter: str) -> Iterator[None]:
    """An adapter's errors naming it as the package does, not by its staging path."""
    try:
        yield
    except AdapterError as exc:
        raise AdapterError(f"package {adapter!r}", exc.problems) from exc
