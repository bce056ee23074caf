"""The service's own commands: serve, keys, backup, restore. The client commands (say, voices,
jobs) come from the SDK: `voicefoundry_client.cli`, registered by server/cli.py."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the speech service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir")
    serve.add_argument("--config", type=Path, help="settings file (YAML or JSON)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="build a tiny model and demo voices into the data dir, offline",
    )
    serve.set_defaults(handler=_serve)

    for name, help_text in (
        ("backup", "snapshot the registry and voice packages into a new directory (live)"),
        ("restore", "bring a backup back into a new data dir"),
    ):
        command = subparsers.add_parser(name, help=help_text)
        command.add_argument("dir", type=Path, help="the backup directory")
        command.add_argument("--data-dir")
        command.add_argument("--config", type=Path, help="settings file (YAML or JSON)")
        command.set_defaults(handler=_backup_or_restore, action=name)

    from server import keys_cli

    keys_cli.register(subparsers)  # keys [create] | list | revoke | rotate | limit


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.logs import serve_log_config
    from server.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            args.config,
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            demo=True if args.demo else None,
        )
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.api_keys_file is not None:
        from server.auth import KeyStore

        try:
            KeyStore.load_configured(settings.api_keys_file)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if settings.api_keys == "database":
        from server.keystore_db import preflight

        try:
            preflight(settings)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not settings.models and not settings.demo:
        print(
            "error: no models configured (add `models:` to --config, or use --demo)",
            file=sys.stderr,
        )
        return 2
    from server.hub import HubError, preflight

    try:
        preflight(settings)  # a hub model offline with no local copy: one line, no start
    except HubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from server.http_protocol import header_timeout_protocol

    # uvicorn stops gracefully on SIGTERM, then raises it again under the handler that was there
    # before: this one, so a stop asked for by systemd, `docker stop` or launchd exits 0.
    signal.signal(signal.SIGTERM, _exit_zero)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=header_timeout_protocol(settings.header_read_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        log_config=serve_log_config(),
        log_level="info",
    )
    return 0


def _exit_zero(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _backup_or_restore(args: argparse.Namespace) -> int:
    from server.backup import BackupError, backup, restore
    from server.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config, data_dir=args.data_dir)
        data, url = settings.data_path, settings.database_url
        backing_up = args.action == "backup"
        manifest = backup(data, args.dir, url) if backing_up else restore(args.dir, data, url)
    except (BackupError, SettingsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"voices": len(manifest["voices"]), "jobs": manifest["jobs"]}))
    return 0
