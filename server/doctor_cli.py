"""`voicefoundry doctor MODEL --config FILE`: MODEL may also name a configured model.

The command itself is finetune's (`finetune/cli.py`, `finetune.model_doctor`); the service only
adds `--config` and the look-up of a name among the settings' `models:`, whose `family` the
report then checks against what the directory holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def extend(subparsers: argparse._SubParsersAction) -> None:
    doctor = subparsers.choices["doctor"]
    doctor.add_argument(
        "--config", type=Path, help="settings file: MODEL may be a name under its `models:`"
    )
    doctor.set_defaults(resolve_model=resolve_model)


def resolve_model(args: argparse.Namespace) -> tuple[str, str | None]:
    """(path or hub id, the family the settings give it or None) for MODEL."""
    from server.settings import load_settings

    name = str(args.model)
    if args.config is None and Path(name).expanduser().exists():
        return name, None
    settings = load_settings(args.config)  # SettingsError is a ValueError: one clear line
    spec = settings.models.get(name)
    if spec is not None:
        return spec.path, spec.family
    if args.config is not None and "/" not in name and not Path(name).expanduser().exists():
        known = ", ".join(settings.models) or "none"
        raise ValueError(f"{name!r} is neither a directory nor a model in {args.config} ({known})")
    return name, None
