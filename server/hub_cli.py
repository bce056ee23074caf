"""`voicefoundry pull MODEL`: fetch a hub model into the hub cache ahead of a start.

MODEL is a model named in the settings (`--config`) whose path is a hub id, or a hub id itself
(`--revision`, `--family`). Errors are one line on stderr; the snapshot is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune.families import FAMILIES


def register(subparsers: argparse._SubParsersAction) -> None:
    pull = subparsers.add_parser(
        "pull", help="download a hub model into the hub cache (what a start would fetch)"
    )
    pull.add_argument("model", help="a model name under the settings' `models:`, or a hub id")
    pull.add_argument("--revision", help="the commit, tag or branch to fetch (default: main)")
    pull.add_argument(
        "--family",
        choices=list(FAMILIES),
        help="which files to fetch, for a hub id (default: the configured model's, or qwen3_tts)",
    )
    pull.add_argument("--data-dir", help="its hub cache is DATA_DIR/hub (unless HF_HOME is set)")
    pull.add_argument("--config", type=Path, help="settings file (YAML or JSON)")
    pull.set_defaults(handler=_pull)


def _pull(args: argparse.Namespace) -> int:
    from server.hub import HubError
    from server.settings import SettingsError

    try:
        return _run(args)
    except (HubError, SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from finetune.loading import hub_repo_id

    from huggingface_hub.utils import disable_progress_bars

    from server.hub import Download, HubModel, cached, fetch
    from server.settings import load_settings

    settings = load_settings(args.config, data_dir=args.data_dir)
    data = settings.data_path
    spec = settings.models.get(args.model)
    if spec is not None:
        repo = hub_repo_id(spec.path)
        if repo is None:
            raise ValueError(
                f"model {args.model!r} is a local directory ({spec.path}): no download"
            )
        model = HubModel(
            args.model, repo, args.revision or spec.revision, args.family or spec.family
        )
    elif hub_repo_id(args.model) is not None:
        model = HubModel(args.model, args.model, args.revision, args.family or "qwen3_tts")
    else:
        known = ", ".join(settings.models) or "none configured"
        raise ValueError(
            f"{args.model!r} is neither a hub id (owner/name) nor a configured model ({known})"
        )

    snapshot = cached(model, data)
    download = Download(model)
    if snapshot is None:
        disable_progress_bars()  # our own progress lines instead of tqdm's bars
        snapshot = fetch(download, data, report=lambda line: print(line, file=sys.stderr))
    print(
        json.dumps(
            {
                "model": model.name,
                "repo_id": model.repo_id,
                "revision": model.revision,
                "path": str(snapshot),
                "downloaded": download.state == "done",
            }
        )
    )
    return 0
