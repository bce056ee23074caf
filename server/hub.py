"""Models named by hub id: found in the hub cache, or fetched into it through huggingface_hub.

A model whose `path` is a hub id ("owner/name", `finetune.loading.hub_repo_id`) is looked up in
the hub cache first (no network). When it is not there whole, it is downloaded: the revision
resolved to its commit, only the files its family declares (`Family.hub_files`) fetched by
`huggingface_hub.snapshot_download`, its progress readable while it runs (`/readyz`, the log).

The cache is `<data_dir>/hub`, unless `HF_HUB_CACHE` or `HF_HOME` is set: then huggingface_hub's
own cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`), shared with other tools. `HF_ENDPOINT` names
the hub (a mirror, or the tests' loopback server); `HF_HUB_OFFLINE=1` never reaches it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.families import get_family
from finetune.loading import hub_repo_id

from server.settings import ModelSpec, Settings

log = logging.getLogger("voicefoundry.hub")

CACHE_FOLDER = "hub"  # under the data dir when neither HF_HUB_CACHE nor HF_HOME is set
DEFAULT_REVISION = "main"
COMMIT = re.compile(r"[0-9a-f]{40}")
LOG_EVERY_S = 2.0

State = Literal["waiting", "resolving", "downloading", "done", "failed"]


class HubError(Exception):
    """A hub model that cannot be had: one line, naming the model and what to do."""


def cache_dir(data: Path) -> Path:
    """Where hub models are cached: huggingface_hub's own cache when HF_HUB_CACHE or HF_HOME
    says where it is, else a folder of the data dir."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser().resolve()
    if os.environ.get("HF_HOME"):
        return (Path(os.environ["HF_HOME"]).expanduser() / "hub").resolve()
    return data / CACHE_FOLDER


def hub_endpoint() -> str | None:
    """HF_ENDPOINT as the process sees it now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.is_offline_mode() or flag in ("1", "on", "yes", "true")


@dataclass(frozen=True)
class HubModel:
    name: str  # the configured model's name (`pull REPO`: the repo id)
    repo_id: str
    revision: str | None  # None: the default branch
    family: str

    @property
    def patterns(self) -> list[str] | None:
        return list(get_family(self.family).hub_files) or None

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision or DEFAULT_REVISION}"

    def pull_command(self, data: Path) -> str:
        parts = ["voicefoundry pull", self.repo_id]
        if self.revision:
            parts += ["--revision", self.revision]
        parts += ["--family", self.family]
        if not (os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME")):
            parts += ["--data-dir", str(data)]
        return " ".join(parts)

    def missing_message(self, data: Path, reason: str) -> str:
        return (
            f"model {self.name!r} ({self.label}) is not in the hub cache {cache_dir(data)} and "
            f"{reason}: run `{self.pull_command(data)}` where the hub is reachable, or put the "
            "model's files in a directory and give that directory as its path"
        )


def hub_model(name: str, spec: ModelSpec) -> HubModel | None:
    repo = hub_repo_id(spec.path)
    return None if repo is None else HubModel(name, repo, spec.revision, spec.family)


@dataclass
class Download:
    """One model's fetch: what /readyz and the log report while it runs."""

    model: HubModel
    state: State = "waiting"
    commit: str | None = None
    bytes_total: int | None = None
    error: str | None = None
    _blobs: Path | None = None
    _before: frozenset[str] = frozenset()
    _done_at_end: int | None = None

    def bytes_done(self) -> int:
        """Bytes written into the cache's blob folder since the download began (finished files
        and the partial ones huggingface_hub is writing)."""
        if self._done_at_end is not None:
            return self._done_at_end
        if self._blobs is None or not self._blobs.is_dir():
            return 0
        done = 0
        for entry in os.scandir(self._blobs):
            if entry.name not in self._before:
                # a partial file may be renamed into place meanwhile
                with contextlib.suppress(FileNotFoundError):
                    done += entry.stat(follow_symlinks=False).st_size
        return min(done, self.bytes_total) if self.bytes_total is not None else done

    def report(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "repo_id": self.model.repo_id,
            "revision": self.model.revision,
            "commit": self.commit,
            "state": self.state,
            "bytes_done": self.bytes_done(),
            "bytes_total": self.bytes_total,
            "error": self.error,
        }

    def line(self) -> str:
        what = f"model {self.model.name!r} ({self.model.label})"
        if self.state == "downloading":
            total = self.bytes_total or 0
            return f"downloading {what}: {_mb(self.bytes_done())} of {_mb(total)} MB"
        if self.state == "failed":
            return self.error or f"{what}: download failed"
        return f"{what}: {self.state}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


@dataclass
class Downloads:
    """The hub models a server start is fetching, then loading; None on app.state otherwise."""

    items: list[Download] = field(default_factory=list)
    failed: str | None = None  # a download, or the load after it, that did not succeed
    finished: bool = False

    def detail(self) -> str:
        if self.failed is not None:
            return self.failed
        active = [d.line() for d in self.items if d.state != "done"]
        return "; ".join(active) or "models downloaded; loading them"

    def report(self) -> list[dict[str, Any]]:
        return [d.report() for d in self.items]


def cached(model: HubModel, data: Path) -> Path | None:
    """The model's complete snapshot in the cache, or None (never touches the network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                model.repo_id,
                revision=model.revision or DEFAULT_REVISION,
                cache_dir=cache_dir(data),
                allow_patterns=model.patterns,
                local_files_only=True,
            )
        )
    except Exception:  # LocalEntryNotFoundError, IncompleteSnapshotError, a damaged ref ...
        return None


def split_models(
    models: dict[str, ModelSpec], data: Path
) -> tuple[dict[str, ModelSpec], list[Download]]:
    """The models as local directories (hub ids found in the cache replaced by their snapshot)
    and the downloads the others still need."""
    ready: dict[str, ModelSpec] = {}
    pending: list[Download] = []
    for name, spec in models.items():
        model = hub_model(name, spec)
        if model is None:
            ready[name] = spec
            continue
        snapshot = cached(model, data)
        if snapshot is None:
            pending.append(Download(model))
            continue
        if model.revision is None:
            warn_unpinned(model, snapshot.name)
        ready[name] = ModelSpec(path=str(snapshot), family=spec.family)
    return ready, pending


def warn_unpinned(model: HubModel, commit: str) -> None:
    log.warning(
        "model %r names %s without a pinned revision: using %s at commit %s; pin it with "
        "`revision: %s`",
        model.name,
        model.repo_id,
        DEFAULT_REVISION,
        commit,
        commit,
    )


def check_reachable(pending: Iterable[Download], data: Path) -> None:
    """Before a server starts: each model still to download can be had (HubError if not)."""
    for download in pending:
        _resolve(download.model, data)


def _resolve(model: HubModel, data: Path) -> tuple[str, list[Any]]:
    """(commit, the family's files at that commit) from the hub; HubError with one line."""
    if offline():
        raise HubError(model.missing_message(data, "HF_HUB_OFFLINE is set"))
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(endpoint=hub_endpoint())
    try:
        info = api.model_info(model.repo_id, revision=model.revision)
        commit = str(info.sha)
        tree = [
            f
            for f in api.list_repo_tree(model.repo_id, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        ]
    except Exception as exc:  # the hub client raises several unrelated types here
        raise HubError(_failure(model, data, exc)) from None
    wanted = list(filter_repo_objects(tree, allow_patterns=model.patterns, key=lambda f: f.path))
    if not wanted:
        patterns = ", ".join(model.patterns or ["*"])
        raise HubError(
            f"model {model.name!r} ({model.label}) holds none of the files a "
            f"{get_family(model.family).title} model needs ({patterns})"
        )
    return commit, wanted


def _failure(model: HubModel, data: Path, exc: Exception) -> str:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RevisionNotFoundError):
        return (
            f"model {model.name!r}: the hub has no revision {model.revision!r} of {model.repo_id}"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return f"model {model.name!r}: the hub has no repository {model.repo_id} (or it is private)"
    if isinstance(exc, OfflineModeIsEnabled):
        return model.missing_message(data, "HF_HUB_OFFLINE is set")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "an error"
        return model.missing_message(data, f"the hub answered {status}")
    endpoint = hub_endpoint() or "https://huggingface.co"
    return model.missing_message(
        data, f"the hub at {endpoint} cannot be reached ({type(exc).__name__})"
    )


def fetch(
    download: Download,
    data: Path,
    report: Callable[[str], None] = log.info,
    every_s: float = LOG_EVERY_S,
) -> Path:
    """Download the model's files into the cache; its snapshot directory. Progress goes to
    `download` (read by /readyz) and, every `every_s`, to `report`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    model = download.model
    download.state = "resolving"
    try:
        commit, files = _resolve(model, data)
    except HubError as exc:
        download.state, download.error = "failed", str(exc)
        raise
    if model.revision is None:
        warn_unpinned(model, commit)
    cache = cache_dir(data)
    storage = cache / repo_folder_name(repo_id=model.repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    download.commit = commit
    download.bytes_total = sum(f.size for f in files if not (snapshot / f.path).exists())
    download._blobs = storage / "blobs"
    if download._blobs.is_dir():
        download._before = frozenset(os.listdir(download._blobs))
    download.state = "downloading"
    report(f"{download.line()} ({len(files)} files)")

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["path"] = snapshot_download(
                model.repo_id,
                revision=commit,  # resolved once: every file comes from the same commit
                cache_dir=cache,
                allow_patterns=model.patterns,
                endpoint=hub_endpoint(),
            )
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"hub-{model.name}", daemon=True)
    worker.start()
    while True:
        worker.join(every_s)
        if not worker.is_alive():
            break
        report(download.line())
    if "error" in outcome:
        error = outcome["error"]
        download.state = "failed"
        download.error = (
            f"download of model {model.name!r} ({model.label}) stopped: "
            f"{type(error).__name__}: {_first_line(error)}; the files it finished are kept: run "
            f"`{model.pull_command(data)}` or start again to fetch the rest"
        )
        raise HubError(download.error) from None
    if model.revision is not None and not COMMIT.fullmatch(model.revision):
        _write_ref(storage, model.revision, commit)
    elif model.revision is None:
        _write_ref(storage, DEFAULT_REVISION, commit)
    download._done_at_end = download.bytes_total
    download.state = "done"
    report(download.line())
    return Path(outcome["path"])


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """Record which commit a branch or tag named, as huggingface_hub's cache does (refs/NAME),
    so that an offline start finds the snapshot by the revision the settings give."""
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    staging = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    staging.write_text(commit)
    staging.replace(ref)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no detail"


def preflight(settings: Settings) -> None:
    """`voicefoundry serve` before it binds: every hub model is in the cache or can be fetched
    (offline, or the hub unreachable, with no local copy: HubError, one line)."""
    _, pending = split_models(dict(settings.models), settings.data_path)
    check_reachable(pending, settings.data_path)
