"""`voicefoundry keys`: create, list, revoke, rotate API keys and set their limits; `import`
moves a key file's keys into the registry's database.

Where the keys are: `--file F` is a key file. Otherwise the settings (`--config`, the
VOICEFOUNDRY_* environment, `--data-dir`, `--database-url`) say: with `api_keys: database` or
an explicit `--database-url` the registry's database (server/keystore_db.py), else their
`api_keys_file`. A key file edit rewrites it atomically (server/keyfile.py) and a running server
re-reads it on its next request; a database edit is one transaction and every server sharing the
database picks it up within a second. None needs a restart. Only `create` and `rotate` print a
secret (once: only its hash is kept); `list` never does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
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
    keys.add_argument("--config", type=Path, help="the server's settings file (YAML or JSON)")
    keys.add_argument("--data-dir", help="the data dir (its registry.sqlite3)")
    keys.add_argument("--database-url", help="the registry's database: keys kept there")
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

    moving = commands.add_parser(
        "import",
        help="copy a key file's keys into the registry's database (hashes: no secret needed)",
    )
    moving.add_argument("--file", type=Path, required=True, help="the key file to copy")
    _settings_options(moving)
    moving.set_defaults(handler=_import)


def _file_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: `keys --file F list` and `keys list --file F` both work.
    parser.add_argument("--file", type=Path, default=argparse.SUPPRESS)
    _settings_options(parser)


def _settings_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="the server's settings file"
    )
    parser.add_argument("--data-dir", default=argparse.SUPPRESS, help="its registry.sqlite3")
    parser.add_argument(
        "--database-url", default=argparse.SUPPRESS, help="the registry's database: keys there"
    )


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


def _target(args: argparse.Namespace, *, database_only: bool = False) -> Path | str:
    """The key file, or the database URL (a str), the command edits; KeyError: none given."""
    if args.file is not None and not database_only:
        return Path(args.file)
    from server.keystore_db import database_url
    from server.settings import load_settings

    settings = load_settings(args.config, data_dir=args.data_dir, database_url=args.database_url)
    if args.database_url is not None or settings.api_keys == "database":
        return database_url(settings)
    if database_only:
        raise KeyError(
            "import copies keys into the registry's database: give --database-url, or a "
            "--config whose settings say api_keys: database"
        )
    if settings.api_keys_file is not None:
        return Path(settings.api_keys_file)
    raise KeyError(
        "--file is required (the server's api_keys_file), or --config / --database-url for "
        "keys in the registry's database"
    )


@contextlib.contextmanager
def _editing(target: Path | str) -> Iterator[Any]:
    if isinstance(target, Path):
        from server.keyfile import edit_key_file

        with edit_key_file(target) as store:
            yield store
        return
    from server.keystore_db import cli_engine, edit_key_table

    engine = cli_engine(target)
    try:
        with edit_key_table(engine) as store:
            yield store
    finally:
        engine.dispose()


def _failed(exc: BaseException) -> int:
    import sqlalchemy as sa

    if isinstance(exc, KeyError):
        message = exc.args[0]
    elif isinstance(exc, sa.exc.SQLAlchemyError):
        message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    else:
        message = str(exc)
    print(f"error: {message}", file=sys.stderr)
    return 2


def _print(data: dict[str, Any]) -> None:
    print(json.dumps(data))


def _run(args: argparse.Namespace, action: Any) -> int:
    import sqlalchemy as sa

    from server.db.migrate import MigrationError

    try:
        with _editing(_target(args)) as store:
            result = action(store)
    except (KeyError, OSError, ValueError, sa.exc.SQLAlchemyError, MigrationError) as exc:
        return _failed(exc)
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
    import sqlalchemy as sa

    from server.auth import ApiKey, KeyStore
    from server.db.migrate import MigrationError

    keys: tuple[ApiKey, ...]
    try:
        target = _target(args)
        if isinstance(target, Path):
            keys = KeyStore.load(target).keys
        else:
            from server.keystore_db import cli_engine, list_keys

            engine = cli_engine(target)
            try:
                keys = list_keys(engine)
            finally:
                engine.dispose()
    except (KeyError, OSError, ValueError, sa.exc.SQLAlchemyError, MigrationError) as exc:
        return _failed(exc)
    for key in keys:  # never the secret (not stored) nor its hash
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


def _import(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from server.auth import KeyStore
    from server.db.migrate import MigrationError
    from server.keystore_db import cli_engine, import_keys

    try:
        url = _target(args, database_only=True)
        assert isinstance(url, str)
        source = KeyStore.load(args.file)
        engine = cli_engine(url)
        try:
            imported, present = import_keys(engine, source)
        finally:
            engine.dispose()
    except (KeyError, OSError, ValueError, sa.exc.SQLAlchemyError, MigrationError) as exc:
        return _failed(exc)
    _print({"imported": imported, "already_there": present})
    return 0


def _limits_out(limits: KeyLimits) -> dict[str, Any]:
    return {"limits": msgspec.to_builtins(limits)}
