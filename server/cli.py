"""The `voicefoundry` console script: the finetune commands plus the service's own."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from finetune import cli as finetune_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voicefoundry", description="Self-hosted MLX speech service and voice fine-tuning."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    finetune_cli.register(subparsers)
    from server import commands

    commands.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return finetune_cli.run(build_parser(), argv)
