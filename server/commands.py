"""The service's commands: serve, voices (import / list / delete), keys."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


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

    voices = subparsers.add_parser("voices", help="manage the voices of a running server")
    voices.add_argument("--url", default=os.environ.get("VOICEFOUNDRY_URL", DEFAULT_URL))
    voices.add_argument("--api-key", default=os.environ.get("VOICEFOUNDRY_API_KEY"))
    vsub = voices.add_subparsers(dest="voices_command", required=True)
    imp = vsub.add_parser("import", help="register a voice package (from `voicefoundry bake`)")
    imp.add_argument("package", type=Path)
    imp.add_argument("--name")
    imp.add_argument("--base-model")
    imp.add_argument("--ref-clip", type=Path)
    imp.set_defaults(handler=_voices_import)
    lst = vsub.add_parser("list")
    lst.set_defaults(handler=_voices_list)
    rm = vsub.add_parser("delete")
    rm.add_argument("name")
    rm.set_defaults(handler=_voices_delete)

    keys = subparsers.add_parser("keys", help="create API keys (stored hashed)")
    keys.add_argument("--file", type=Path, required=True)
    keys.add_argument("--scope", choices=("speak", "admin"), default="speak")
    keys.add_argument("--label", default="")
    keys.set_defaults(handler=_keys_add)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
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
    if not settings.models and not settings.demo:
        print(
            "error: no models configured (add `models:` to --config, or use --demo)",
            file=sys.stderr,
        )
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        log_level="info",
    )
    return 0


def _client(args: argparse.Namespace):
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=600)


def _report(response) -> int:
    if response.is_success:
        print(json.dumps(response.json(), indent=2))
        return 0
    print(f"error: HTTP {response.status_code}: {response.text}", file=sys.stderr)
    return 1


def _voices_import(args: argparse.Namespace) -> int:
    from server.voices import pack_directory

    path: Path = args.package
    data = pack_directory(path) if path.is_dir() else path.read_bytes()
    files = {"package": ("package.tar.gz", data, "application/gzip")}
    if args.ref_clip:
        files["ref_clip"] = (args.ref_clip.name, args.ref_clip.read_bytes(), "audio/wav")
    form = {k: v for k, v in (("name", args.name), ("base_model", args.base_model)) if v}
    with _client(args) as client:
        return _report(client.post("/voices/import", files=files, data=form))


def _voices_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _report(client.get("/voices"))


def _voices_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _report(client.delete(f"/voices/{args.name}"))


def _keys_add(args: argparse.Namespace) -> int:
    from server.auth import KeyStore

    store = KeyStore.load(args.file, missing_ok=True)
    secret, key = store.add(args.scope, args.label)
    store.save(args.file)
    print(json.dumps({"id": key.id, "scope": key.scope, "secret": secret}))
    return 0
