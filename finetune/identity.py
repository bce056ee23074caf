"""What a checkpoint's weights are: a content hash plus how (and whether) they are quantised.

A voice records the identity of the base it was trained against; a server compares it with the
identity of the model it runs, so a voice is never served on other weights (another checkpoint,
or the same one quantised differently) without saying so.

The hash covers the top-level `model*.safetensors` files (sorted by name; each file's name and
size, then its bytes, streamed in 1 MiB blocks). It is cached per process by each file's (path,
size, mtime), so a server calls it at start and for every import at the cost of a few stats.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

BLOCK = 1 << 20

_cache: dict[tuple[tuple[str, int, int, int], ...], str] = {}
_lock = threading.Lock()


def weight_files(model_dir: Path | str) -> list[Path]:
    return sorted(p for p in Path(model_dir).glob("model*.safetensors") if p.is_file())


def weights_sha256(model_dir: Path | str) -> str:
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model*.safetensors weight files")
    stats = [(f, f.stat()) for f in files]
    key = tuple((str(f.resolve()), s.st_ino, s.st_size, s.st_mtime_ns) for f, s in stats)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for file, stat in stats:
        digest.update(f"{file.name}\0{stat.st_size}\0".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(BLOCK), b""):
                digest.update(block)
    value = digest.hexdigest()
    with _lock:
        _cache[key] = value
    return value


def quantization(model_dir: Path | str) -> dict[str, Any] | None:
    """config.json's `quantization` (or `quantization_config`), or None for full precision."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization", config.get("quantization_config"))
    return quant if isinstance(quant, dict) else None


def weights_identity(model_dir: Path | str) -> dict[str, Any]:
    """{"weights_sha256": ..., "quantization": {...} | None} of a checkpoint directory."""
    return {"weights_sha256": weights_sha256(model_dir), "quantization": quantization(model_dir)}


def same_base(recorded: dict[str, Any] | None, actual: dict[str, Any]) -> list[str]:
    """Why a voice trained against `recorded` must not run on `actual` (empty: it may)."""
    if not recorded:
        return ["the voice does not record the identity of the base it was trained against"]
    problems = []
    if recorded.get("weights_sha256") != actual.get("weights_sha256"):
        problems.append(
            f"trained against weights {str(recorded.get('weights_sha256'))[:12]}, "
            f"the loaded model has {str(actual.get('weights_sha256'))[:12]}"
        )
    if recorded.get("quantization") != actual.get("quantization"):
        problems.append(
            f"trained against quantization {_describe(recorded.get('quantization'))}, "
            f"the loaded model has {_describe(actual.get('quantization'))}"
        )
    return problems


def _describe(quant: dict[str, Any] | None) -> str:
    if not quant:
        return "none (full precision)"
    return (
        f"{quant.get('bits')}-bit, group size {quant.get('group_size')}, "
        f"{quant.get('mode', 'affine')}"
    )
