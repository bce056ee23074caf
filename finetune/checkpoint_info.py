"""What a model directory holds, read from its files without loading it (`voicefoundry doctor`).

Each family's `describe(path)` (its entry module, reached through the registry) says whether a
directory is one of its checkpoints and fills a `CheckpointDescription`; the helpers here read what
every family's files share: safetensors headers (names, dtypes, shapes, the `format` metadata
mlx-audio and transformers write) and the `quantization` section mlx-audio's converter writes.
Nothing here imports MLX.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Safetensors dtype name -> bytes per element.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "U8": 1}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_HEADER = 100_000_000


@dataclass
class TensorFile:
    """One safetensors file's header: metadata and name -> (dtype, shape)."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...]]]

    @property
    def format(self) -> str | None:
        """`pt` (transformers / PyTorch), `mlx` (mlx-audio's converter), or None."""
        return self.metadata.get("format")


def read_tensor_file(file: Path) -> TensorFile:
    """The header of a .safetensors file (ValueError / OSError when it is not one)."""
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        total = file.stat().st_size
        if size > total - 8 or size > _MAX_HEADER:
            raise ValueError(f"header length {size} does not fit in a {total}-byte file")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            tensors[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{name}: malformed header entry ({exc})") from exc
        if not 0 <= start <= end <= total - 8 - size:
            raise ValueError(f"{name}: data offsets {start}..{end} lie outside the file")
    return TensorFile(
        path=file, metadata={str(k): str(v) for k, v in meta.items()}, tensors=tensors
    )


def read_tensor_files(files: list[Path], root: Path) -> tuple[list[TensorFile], list[str]]:
    """Every readable header of `files`, and one problem per file that is missing or unreadable."""
    read: list[TensorFile] = []
    problems: list[str] = []
    for file in files:
        name = file.relative_to(root) if file.is_relative_to(root) else file
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            read.append(read_tensor_file(file))
        except (OSError, ValueError) as exc:
            problems.append(f"{name} is not a readable safetensors file ({exc})")
    return read, problems


def weight_files(path: Path, stem: str = "model") -> tuple[list[Path], list[str]]:
    """The main weight files: those `<stem>.safetensors.index.json` maps, else all
    `<stem>*.safetensors`."""
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return [], [f"{index.name} is not a valid index ({exc})"]
        return [path / str(n) for n in names], []
    found = sorted(path.glob(f"{stem}*.safetensors"))
    if not found:
        return [path / f"{stem}.safetensors"], []  # reported missing by read_tensor_files
    return found, []


def read_json(file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object from `file`, or None and the problem."""
    if not file.is_file():
        return None, f"{file.name} is missing"
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{file.name} is not valid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"{file.name} does not hold an object"
    return data, None


def stored_dtypes(files: list[TensorFile]) -> dict[str, int]:
    """Bytes stored per safetensors dtype, largest first."""
    totals: Counter[str] = Counter()
    for file in files:
        for dtype, shape in file.tensors.values():
            count = 1
            for d in shape:
                count *= d
            totals[dtype] += count * DTYPE_BYTES.get(dtype, 0)
    return dict(totals.most_common())


def main_float_dtype(dtypes: dict[str, int]) -> str | None:
    """The float dtype holding most bytes (quantised weights are packed U32: not counted)."""
    floats = [(size, d) for d, size in dtypes.items() if d in DTYPE_NAMES]
    return DTYPE_NAMES[max(floats)[1]] if floats else None


def quantization_summary(quant: dict[str, Any] | None) -> dict[str, Any] | None:
    """config.json's quantization object (`finetune.identity.quantization`, as mlx-audio's
    converter writes it) summarised: bits, group size, mode, and for a mixed predicate
    (per-layer entries) how many layers take each bit width. None: not quantised."""
    if quant is None:
        return None
    summary: dict[str, Any] = {
        "bits": quant.get("bits"),
        "group_size": quant.get("group_size"),
        "mode": quant.get("mode", "affine"),
    }
    per_layer = {k: v for k, v in quant.items() if isinstance(v, dict)}
    if per_layer:
        widths = Counter(int(v.get("bits", summary["bits"] or 0)) for v in per_layer.values())
        summary["mixed"] = {f"{bits}-bit": n for bits, n in sorted(widths.items())}
    return summary


def quantization_text(quant: dict[str, Any] | None) -> str:
    if quant is None:
        return "none"
    text = f"{quant['bits']}-bit {quant['mode']}, group size {quant['group_size']}"
    mixed = quant.get("mixed")
    if mixed:
        layers = ", ".join(f"{n} layers {bits}" for bits, n in mixed.items())
        text += f"; mixed predicate: {layers}"
    return text


@dataclass
class CheckpointDescription:
    """What one family found in a directory it recognises as its own."""

    family: str
    layout: str  # the distribution it is laid out as (official, mlx-community, release, ...)
    variant: str  # e.g. "Base", "CustomVoice"
    size: str  # e.g. "0.6B", or "custom (hidden 64, 2 layers)"
    dtype: str | None  # the float dtype most weight bytes are stored in
    quantization: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # found without loading

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
