"""Backup and restore of a data dir while the server runs: `voicefoundry backup DIR` and
`voicefoundry restore DIR`.

A backup is a consistent snapshot: the registry is copied with SQLite's online backup API (a
point-in-time copy, safe beside a running server in WAL mode), and the packages of exactly the
voices that snapshot lists are copied beside it. A voice's folder is complete before its row
exists (voices.py renames the staged package into place, then registers it) and is not written
again, so the copy needs no lock. Jobs keep their rows but not their folders (uploads and
checkpoints): on restore, unfinished jobs are marked failed with that reason.

This covers the embedded SQLite registry. A registry in PostgreSQL (`database_url`) is backed
up with PostgreSQL's own tools (``pg_dump -Fc`` / ``pg_restore``, or the server's continuous
archiving) and the shared artifacts dir with a file-level copy; these commands refuse it rather
than copy half of it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from finetune.fsutil import atomic_directory

from server.db.engine import redacted
from server.registry import Registry

REGISTRY_FILE = "registry.sqlite3"
MANIFEST = "backup.json"
FORMAT = "voicefoundry.backup/1"
UNFINISHED = ("queued", "preparing", "training", "baking", "interrupted")


class BackupError(Exception):
    pass


def backup(data_dir: Path, out_dir: Path, database_url: str | None = None) -> dict[str, Any]:
    """Snapshot `data_dir` into `out_dir` (which must not exist); returns the manifest."""
    _embedded_only(database_url, "back up")
    source = Path(data_dir) / REGISTRY_FILE
    if not source.is_file():
        raise BackupError(f"{data_dir} has no registry ({REGISTRY_FILE})")
    if Path(out_dir).exists():
        raise BackupError(f"{out_dir} already exists: back up into a new directory")
    with atomic_directory(Path(out_dir)) as staging:
        _sqlite_backup(source, staging / REGISTRY_FILE)
        snapshot = Registry(staging / REGISTRY_FILE)
        try:
            voices = [v.name for v in snapshot.list()]
            jobs = len(snapshot.list_jobs())
        finally:
            snapshot.close()
        missing = []
        for name in voices:
            folder = Path(data_dir) / "voices" / name
            if folder.is_dir():
                shutil.copytree(folder, staging / "voices" / name)
            else:
                missing.append(name)
        manifest = {
            "format": FORMAT,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "voices": voices,
            "jobs": jobs,
            "voices_without_files": missing,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def restore(backup_dir: Path, data_dir: Path, database_url: str | None = None) -> dict[str, Any]:
    """Bring a backup back into `data_dir`, which must hold no registry yet."""
    _embedded_only(database_url, "restore")
    manifest = _manifest(Path(backup_dir))
    data_dir = Path(data_dir)
    if (data_dir / REGISTRY_FILE).exists():
        raise BackupError(f"{data_dir} already has a registry: restore into a new data dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    voices_dir = data_dir / "voices"
    voices_dir.mkdir(exist_ok=True)
    clash = [n for n in manifest["voices"] if (voices_dir / n).exists()]
    if clash:
        raise BackupError(f"{data_dir} already has voice folders: {', '.join(clash[:5])}")
    staging_registry = data_dir / f".{REGISTRY_FILE}.restoring"
    _sqlite_backup(Path(backup_dir) / REGISTRY_FILE, staging_registry)
    registry = Registry(staging_registry)
    try:
        for job in registry.list_jobs():
            if job.state in UNFINISHED:
                reason = "restored from a backup, which keeps no job files"
                registry.update_job(
                    job.id, state="failed", payload={**job.payload, "reason": reason}
                )
    finally:
        registry.close()
    for name in manifest["voices"]:
        source = Path(backup_dir) / "voices" / name
        if source.is_dir():
            with atomic_directory(voices_dir / name) as staging:
                shutil.copytree(source, staging, dirs_exist_ok=True)
    staging_registry.rename(data_dir / REGISTRY_FILE)  # last: the restore is complete
    return manifest


def _embedded_only(database_url: str | None, verb: str) -> None:
    if database_url is not None:
        raise BackupError(
            f"the registry is in {redacted(database_url)} (database_url): {verb} it with "
            "pg_dump / pg_restore; voicefoundry backup and restore cover the embedded SQLite "
            "registry"
        )


def _manifest(backup_dir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((backup_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{backup_dir} is not a voicefoundry backup ({MANIFEST}: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{backup_dir}/{MANIFEST} is not a {FORMAT} manifest")
    if not (backup_dir / REGISTRY_FILE).is_file():
        raise BackupError(f"{backup_dir} lacks {REGISTRY_FILE}")
    return manifest


def _sqlite_backup(source: Path, target: Path) -> None:
    src = sqlite3.connect(source)
    dst = sqlite3.connect(target)
    try:
        with dst:
            src.backup(dst)
    finally:
        dst.close()
        src.close()
