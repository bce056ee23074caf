"""Finding model directories and loading them through mlx-audio without its silent failures."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A model directory that cannot be used, with every problem found in it."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"cannot load model at {path}:\n{listing}")


def hub_repo_id(name: str | Path) -> str | None:
    """`name` as a model hub id ("owner/name"), or None when it names a local path: an existing
    directory, or anything that starts like a path or has not exactly one `/`."""
    text = str(name)
    if Path(text).expanduser().is_dir():
        return None
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or not all(text.split("/")):
        return None
    return text


def resolve_model_path(name: str | Path) -> Path:
    """A local directory, or a hub id already in the local Hugging Face cache (never downloads)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(name)
    if hub_repo_id(text) is not None:
        try:
            from huggingface_hub import snapshot_download

            with offline_hub():
                return Path(snapshot_download(text, local_files_only=True))
        except Exception as exc:  # the hub client raises several unrelated types here
            raise CheckpointError(
                text, [f"not a local directory and not in the local hub cache ({exc})"]
            ) from exc
    raise CheckpointError(text, ["no such model directory"])


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(path, ["config.json is missing"])
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, [f"config.json is not valid JSON: {exc}"]) from exc
    if not isinstance(config, dict):
        raise CheckpointError(path, ["config.json does not hold an object"])
    return config


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """No model hub is reachable: make the hub client fail fast instead of retrying."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """mlx-audio reports load failures by printing; keep what it printed for our error."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


def tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])
