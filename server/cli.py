"""The `voicefoundry` console script: the finetune commands plus the service's own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from finetune import cli as finetune_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voicefoundry", description="Self-hosted MLX speech service and voice fine-tuning."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    finetune_cli.register(subparsers)
    from server import commands, doctor_cli

    commands.register(subparsers)
    doctor_cli.extend(subparsers)  # doctor MODEL may name a configured model (--config)
    from server import hub_cli

    hub_cli.register(subparsers)  # pull MODEL: a hub model into the cache
    from server import db_cli

    db_cli.register(subparsers)  # db upgrade | current: the registry's migrations
    from server import worker_cli

    worker_cli.register(subparsers)  # worker: trains the jobs replicas queue
    try:
        from voicefoundry_client import cli as client_cli
    except ImportError:  # the SDK is its own distribution (clients/python)
        _client_commands_missing(subparsers)
    else:
        client_cli.register(subparsers)
    return parser


def _client_commands_missing(subparsers: argparse._SubParsersAction) -> None:
    def handler(args: argparse.Namespace) -> int:
        del args
        print(
            "error: this command needs the Python SDK: pip install -e clients/python",
            file=sys.stderr,
        )
        return 2

    for name in ("say", "voices", "jobs"):
        parser = subparsers.add_parser(name, help="(needs the voicefoundry-client SDK)")
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        parser.set_defaults(handler=handler)


def main(argv: Sequence[str] | None = None) -> int:
    return finetune_cli.run(build_parser(), argv)
