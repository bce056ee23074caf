"""`voicefoundry keys`: create, list, revoke, rotate API keys and set their limits.

Every edit rewrites the key file atomically (server/keyfile.py); a running server re-reads it on
its next request, so none of these needs a restart. Only `create` and `rotate` print a secret
(once: the file keeps its hash); `list` never does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from server.limits import KeyLimits

LIMIT_FLAGS = tuple(KeyLimits.__struct_fields__)


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="manage API keys: create (the default), list, revoke, rotate, limit",
        description="With no subcommand: create a key (as `keys create`).",
    )
    keys.add_argument("--file", type=Path, help="the key file (api_keys_file)")
    keys.add_argument("--scope", choices=("speak", "admin"), default="speak")
    keys.add_argument("--label", default="")
    keys.set_defaults(handler=_create)
    commands = keys.add_subparsers(dest="keys_command")

    create = commands.add_parser("create", help="a new key; prints its secret once")
    _file_option(create)
    create.add_argument("--scope", choices=("speak", "admin"), default=argparse.SUPPRESS)
    create.add_argument("--label", default=argparse.SUPPRESS)
    _limit_options(create)
    create.set_defaults(handler=_create)

    listing = commands.add_parser("list", help="ids, scopes, labels and limits (no secrets)")
    _file_option(listing)
    listing.set_defaults(handler=_list)

    for name, help_text, handler in (
        ("revoke", "remove a key: a running server refuses it from its next request", _revoke),
        (
            "rotate",
            "a new secret for a key id (same scope, limits, usage); the old one stops",
            _rotate,
        ),
        ("limit", "set a key's limits (a number, or `none` to lift one)", _limit),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("id", help="the key id (the part after vf_ in a secret)")
        _file_option(command)
        if name == "limit":
            _limit_options(command)
        command.set_defaults(handler=handler)


def _file_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: `keys --file F list` and `keys list --file F` both work.
    parser.add_argument("--file", type=Path, default=argparse.SUPPRESS)


def _limit_options(parser: argparse.ArgumentParser) -> None:
    for field in LIMIT_FLAGS:
        parser.add_argument(
            f"--{field.replace('_', '-')}",
            dest=field,
            type=_limit_value,
            default=argparse.SUPPRESS,
            metavar="N|none",
        )


def _limit_value(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or none") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is at least 1 (none: no limit)")
    return value


def _limits(args: argparse.Namespace, current: KeyLimits) -> KeyLimits:
    values = msgspec.structs.asdict(current)
    values.update({f: getattr(args, f) for f in LIMIT_FLAGS if hasattr(args, f)})
    return KeyLimits(**values)


def _key_file(args: argparse.Namespace) -> Path:
    if args.file is None:
        raise KeyError("--file is required (the server's api_keys_file)")
    return Path(args.file)


def _print(data: dict[str, Any]) -> None:
    print(json.dumps(data))


def _run(args: argparse.Namespace, action: Any) -> int:
    from server.keyfile import edit_key_file

    try:
        with edit_key_file(_key_file(args)) as store:
            result = action(store)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print(result)
    return 0


def _create(args: argparse.Namespace) -> int:
    def action(store: Any) -> dict[str, Any]:
        secret, key = store.add(args.scope, args.label)
        limits = _limits(args, key.limits)
        if not limits.is_empty():
            key = store.set_limits(key.id, limits)
        return {"id": key.id, "scope": key.scope, "secret": secret, **_limits_out(key.limits)}

    return _run(args, action)


def _list(args: argparse.Namespace) -> int:
    from server.auth import KeyStore

    try:
        store = KeyStore.load(_key_file(args))
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key in store.keys:  # never the secret (not stored) nor its hash
        _print({"id": key.id, "scope": key.scope, "label": key.label, **_limits_out(key.limits)})
    return 0


def _revoke(args: argparse.Namespace) -> int:
    def action(store: Any) -> dict[str, Any]:
        key = store.remove(args.id)
        if not store.enabled:
            print(
                "warning: no keys left: a running server refuses every request and a new one "
                "will not start until a key is added",
                file=sys.stderr,
            )
        return {"id": key.id, "revoked": True}

    return _run(args, action)


def _rotate(args: argparse.Namespace) -> int:
    def action(store: Any) -> dict[str, Any]:
        secret, key = store.rotate(args.id)
        return {"id": key.id, "scope": key.scope, "secret": secret}

    return _run(args, action)


def _limit(args: argparse.Namespace) -> int:
    def action(store: Any) -> dict[str, Any]:
        current = store.get(args.id)
        if current is None:
            raise KeyError(f"no API key with id {args.id!r}")
        key = store.set_limits(args.id, _limits(args, current.limits))
        return {"id": key.id, **_limits_out(key.limits)}

    return _run(args, action)


def _limits_out(limits: KeyLimits) -> dict[str, Any]:
    return {"limits": msgspec.to_builtins(limits)}
