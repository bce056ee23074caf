"""`voicefoundry doctor MODEL`: what a model directory holds and whether it loads.

Every family in the registry is asked whether the directory is one of its checkpoints (its
entry module's `describe`); the one that recognises it says which layout, variant, size,
quantisation and dtype it holds, and then loads it with its own loader (`load_problems`: the
server's and the trainer's loader, which collects every problem at once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.checkpoint_info import CheckpointDescription, directory_bytes, quantization_text
from finetune.families import FAMILIES
from finetune.loading import CheckpointError, resolve_model_path


@dataclass
class ModelReport:
    model: str  # as asked: a path, hub id or configured name
    path: str | None = None
    family: str | None = None
    title: str | None = None
    description: CheckpointDescription | None = None
    bytes_on_disk: int | None = None
    loads: bool = False
    load_seconds: float | None = None
    problems: list[str] = field(default_factory=list)
    expected_family: str | None = None  # what the settings name it as, when they do

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": self.model,
            "path": self.path,
            "family": self.family,
            "title": self.title,
        }
        described = self.description.to_dict() if self.description is not None else {}
        described.pop("family", None)
        described.pop("problems", None)
        for key in ("layout", "variant", "size", "quantization", "dtype", "details"):
            data[key] = described.get(key)
        data.update(
            bytes_on_disk=self.bytes_on_disk,
            loads=self.loads,
            load_seconds=self.load_seconds,
            expected_family=self.expected_family,
            problems=self.problems,
        )
        return data


def examine(
    model: str | Path, *, expected_family: str | None = None, load: bool = True
) -> ModelReport:
    """Describe `model` (a directory, or a hub id in the local cache) and try to load it."""
    report = ModelReport(model=str(model), expected_family=expected_family)
    try:
        path = resolve_model_path(model)
    except CheckpointError as exc:
        report.problems = list(exc.problems)
        return report
    report.path = str(path)
    found: list[tuple[str, CheckpointDescription]] = []
    for name, family in FAMILIES.items():
        try:
            description = family.entry_module().describe(path)
        except Exception as exc:  # a describer must not hide the others' answers
            report.problems.append(
                f"{name}: could not read the directory ({type(exc).__name__}: {exc})"
            )
            continue
        if description is not None:
            found.append((name, description))
    if not found:
        report.problems.insert(0, _unknown(path))
        return report
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        report.problems.append(f"more than one family recognises it ({names}); taking the first")
    name, description = found[0]
    report.family, report.title = name, FAMILIES[name].title
    report.description = description
    report.bytes_on_disk = directory_bytes(path)
    report.problems += description.problems
    if expected_family is not None and expected_family != name:
        report.problems.append(
            f"the settings say family {expected_family!r}, the directory holds {name!r}"
        )
    if load:
        start = time.perf_counter()
        try:
            load_problems = list(FAMILIES[name].entry_module().load_problems(path))
        except Exception as exc:  # whatever else the loader raised is one more problem
            load_problems = [f"{type(exc).__name__}: {exc}"]
        report.load_seconds = round(time.perf_counter() - start, 3)
        report.loads = not load_problems
        report.problems += [p for p in load_problems if p not in report.problems]
    return report


def _unknown(path: Path) -> str:
    known = ", ".join(FAMILIES)
    config = path / "config.json"
    why = "no config.json"
    if config.is_file():
        from finetune.checkpoint_info import read_json

        data, problem = read_json(config)
        why = problem or f"config.json model_type is {(data or {}).get('model_type')!r}"
    return f"not a checkpoint of any known family ({known}): {why}"


def format_report(report: ModelReport) -> str:
    d = report.description
    lines = [f"model         {report.model}"]
    if report.path is not None and report.path != report.model:
        lines.append(f"path          {report.path}")
    if d is None:
        lines.append("family        unknown")
    else:
        lines += [
            f"family        {report.family} ({report.title})",
            f"layout        {d.layout}",
            f"variant       {d.variant}, {d.size}",
            f"quantization  {quantization_text(d.quantization)}",
            f"dtype         {d.dtype or 'unknown'}",
        ]
        if report.bytes_on_disk is not None:
            lines.append(f"on disk       {report.bytes_on_disk / 2**20:.1f} MiB")
        speakers = d.details.get("speakers")
        if speakers:
            lines.append(f"speakers      {', '.join(speakers)}")
    if report.load_seconds is not None:
        verdict = "yes" if report.loads else "NO"
        lines.append(f"loads         {verdict} ({report.load_seconds:.1f} s)")
    else:
        lines.append("loads         NO" if d is None else "loads         not tried (--no-load)")
    if report.problems:
        lines.append(f"problems ({len(report.problems)}):")
        lines += [f"  - {p}" for p in report.problems]
    return "\n".join(lines)


def exit_code(report: ModelReport, *, load: bool) -> int:
    """0 when it loads as what the settings call it (or, with --no-load, was recognised
    without problems); 1 otherwise."""
    if report.expected_family is not None and report.expected_family != report.family:
        return 1
    if load:
        return 0 if report.loads else 1
    return 0 if report.family is not None and not report.problems else 1
