"""Multipart bodies of `POST /voices` and `POST /voices/import`, checked before sending."""

from __future__ import annotations

import io
import json
import mimetypes
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

# A clip is a path, or an in-memory (file name, bytes) pair.
FileLike: TypeAlias = str | os.PathLike[str] | tuple[str, bytes]
MultipartFile: TypeAlias = tuple[str, tuple[str, bytes, str]]

HYPER_PARAMETERS = ("lora_rank", "epochs", "max_steps", "learning_rate", "batch_size")
STRATEGIES = ("speaker", "language", "duplex")


def read_file(item: FileLike, what: str) -> tuple[str, bytes]:
    """(file name, bytes) of a path or a (name, bytes) pair; a clear error if unreadable."""
    if isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], bytes):
            raise TypeError(f"{what}: expected a path or a (filename, bytes) pair, got {item!r}")
        return Path(item[0]).name, item[1]
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    return path.name, path.read_bytes()


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `stem-N.ext` when an earlier clip already used it (clips from two folders)."""
    if name not in taken:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    n = 1
    while f"{stem}-{n}{dot}{ext}" in taken:
        n += 1
    return f"{stem}-{n}{dot}{ext}"


def _sibling_transcript(item: FileLike) -> str | None:
    if isinstance(item, tuple):
        return None
    text = Path(item).with_suffix(".txt")
    return text.read_text(encoding="utf-8").strip() if text.is_file() else None


def voice_job_form(
    name: str,
    clips: Sequence[FileLike],
    transcripts: Sequence[str] | Mapping[str, str] | None,
    *,
    strategy: str,
    ref: FileLike | Sequence[FileLike] | None,
    base_model: str | None,
    language: str | None,
    hyper: Mapping[str, Any],
    user_clips: Sequence[FileLike] | None = None,
    text_prompt: str | None = None,
) -> tuple[dict[str, str], list[MultipartFile]]:
    """The form fields and files of a fine-tune upload.

    `transcripts`: one text per clip in order, or a mapping from each clip's file name to its
    text, or None to read `CLIP.txt` next to each clip path. Duplex only: `user_clips` (the
    user's side of each clip, same order) and the persona `text_prompt`.
    """
    if isinstance(clips, str | os.PathLike | tuple):
        raise TypeError("clips must be a list of paths or (filename, bytes) pairs")
    if not clips:
        raise ValueError("no clips given")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    files: list[MultipartFile] = []
    names: list[str] = []
    taken: set[str] = set()
    originals: list[str] = []
    for i, clip in enumerate(clips):
        original, data = read_file(clip, f"clips[{i}]")
        unique = _unique(original, taken)
        taken.add(unique)
        names.append(unique)
        originals.append(original)
        files.append(("clips", (unique, data, _content_type(unique))))

    texts: dict[str, str] = {}
    if transcripts is None:
        for clip, unique in zip(clips, names, strict=True):
            text = _sibling_transcript(clip)
            if text is None:
                raise ValueError(
                    f"no transcript for {unique}: pass transcripts=[...] or put "
                    f"{Path(unique).stem}.txt next to the clip"
                )
            texts[unique] = text
    elif isinstance(transcripts, Mapping):
        missing = [o for o in originals if o not in transcripts]
        if missing:
            raise ValueError(f"no transcript for {', '.join(missing[:5])}")
        texts = {u: str(transcripts[o]) for u, o in zip(names, originals, strict=True)}
    else:
        if isinstance(transcripts, str):
            raise TypeError("transcripts must be a list of texts (one per clip) or a mapping")
        if len(transcripts) != len(clips):
            raise ValueError(f"{len(clips)} clips but {len(transcripts)} transcripts")
        texts = {u: str(t) for u, t in zip(names, transcripts, strict=True)}

    refs: Sequence[FileLike]
    if ref is None:
        refs = []
    elif isinstance(ref, str | os.PathLike | tuple):
        refs = [ref]
    else:
        refs = ref
    for i, item in enumerate(refs):
        filename, data = read_file(item, f"ref[{i}]")
        files.append(("ref", (filename, data, _content_type(filename))))

    if user_clips:
        if len(user_clips) != len(clips):
            raise ValueError(f"{len(clips)} clips but {len(user_clips)} user_clips")
        for i, item in enumerate(user_clips):
            filename, data = read_file(item, f"user_clips[{i}]")
            files.append(("user_clips", (filename, data, _content_type(filename))))

    fields = {"name": name, "strategy": strategy, "transcripts": json.dumps(texts)}
    if text_prompt:
        fields["text_prompt"] = text_prompt
    if base_model:
        fields["base_model"] = base_model
    if language:
        fields["language"] = language
    for key, value in hyper.items():
        if value is not None:
            fields[key] = str(value)  # the server checks names and bounds; unknown ones pass
    return fields, files


def clone_form(
    name: str,
    ref: FileLike,
    *,
    text: str | None,
    base_model: str | None,
    language: str | None,
) -> tuple[dict[str, str], list[MultipartFile]]:
    """`POST /voices` with strategy=clone: one reference clip, optionally its transcript."""
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    fields = {"name": name, "strategy": "clone"}
    optional = {"ref_text": text, "base_model": base_model, "language": language}
    fields.update({k: v for k, v in optional.items() if v})
    filename, data = read_file(ref, "ref")
    return fields, [("ref", (filename, data, _content_type(filename)))]


def pack_directory(folder: Path) -> bytes:
    """A voice package directory (from `voicefoundry bake`) as .tar.gz bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for item in sorted(folder.rglob("*")):
            archive.add(item, arcname=str(item.relative_to(folder)), recursive=False)
    return buffer.getvalue()


def import_form(
    package: str | os.PathLike[str] | tuple[str, bytes],
    *,
    name: str | None,
    base_model: str | None,
    ref_clip: FileLike | None,
) -> tuple[dict[str, str], list[MultipartFile]]:
    """The form of `POST /voices/import`: a package directory is packed as .tar.gz first."""
    if not isinstance(package, tuple) and Path(package).is_dir():
        filename, data = "package.tar.gz", pack_directory(Path(package))
    else:
        filename, data = read_file(package, "package")
    kind = "application/zip" if filename.endswith(".zip") else "application/gzip"
    files: list[MultipartFile] = [("package", (filename, data, kind))]
    if ref_clip is not None:
        ref_name, ref_data = read_file(ref_clip, "ref_clip")
        files.append(("ref_clip", (ref_name, ref_data, _content_type(ref_name))))
    fields = {k: v for k, v in (("name", name), ("base_model", base_model)) if v}
    return fields, files
