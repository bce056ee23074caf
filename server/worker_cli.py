"""`voicefoundry worker`: run a training worker (server/worker.py) with the serving replicas'
settings file; `job_runner` need not be set in it (a worker is what "workers" means)."""

from __future__ import annotations

import argparse
import logging.config
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser(
        "worker", help="train the fine-tune jobs replicas queue (job_runner: workers)"
    )
    worker.add_argument("--config", type=Path, help="settings file (YAML or JSON)")
    worker.add_argument("--data-dir")
    worker.add_argument("--database-url", help="instead of the settings' database_url")
    worker.add_argument("--concurrency", type=int, help="jobs trained at once (worker_concurrency)")
    worker.add_argument("--name", help="this worker's name in logs and job rows (host-pid)")
    worker.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from server.logs import serve_log_config
    from server.registry import RegistryError
    from server.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            args.config,
            data_dir=args.data_dir,
            database_url=args.database_url,
            worker_concurrency=args.concurrency,
            job_runner="workers",
        )
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(serve_log_config())
    from server.worker import run_worker

    try:
        return run_worker(settings, args.name)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
