"""Where the shared artifacts live: one place derives every path under `artifacts_dir`.

Artifacts are what several replicas (and hosts) must see alike: voice packages
(``voices/<name>``), uploads in flight (``voices/.upload-*``, ``voices/.import-*``,
``jobs/.incoming-*``) and job folders (``jobs/<id>``: the trainer's files, checkpoints,
previews). They live under `Settings.artifacts_dir`, the data dir unless set; a mount every
replica shares when there are several. Per-process state (logs, caches, the SQLite registry,
the hub cache) stays in the data dir.

Atomic writes: every temporary file or staging folder is made inside the folder its final name
lives in (so in the artifacts dir, never the data dir), and renamed into place: one filesystem,
one rename. The registry stores artifact paths relative to `root`, so each host may mount the
share where it likes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.settings import Settings


@dataclass(frozen=True)
class Artifacts:
    root: Path

    @classmethod
    def of(cls, settings: Settings) -> Artifacts:
        return cls(settings.artifacts_path)

    @property
    def voices(self) -> Path:
        """Voice packages, one folder per registered voice; staging folders start with '.'."""
        return self.root / "voices"

    @property
    def jobs(self) -> Path:
        """Fine-tune job folders, one per job id; uploads in flight start with '.incoming-'."""
        return self.root / "jobs"

    def ensure(self) -> Artifacts:
        for folder in (self.voices, self.jobs):
            folder.mkdir(parents=True, exist_ok=True)
        return self
