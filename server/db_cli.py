"""`voicefoundry db upgrade` and `voicefoundry db current`: the registry's alembic migrations.

The database is the settings' `database_url`, or the embedded SQLite file DATA_DIR/
registry.sqlite3. A server migrates at start anyway; `db upgrade` lets a deploy do it first
(one step before rolling out replicas), and `db current` says where a database stands without
changing it. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    db = subparsers.add_parser("db", help="the registry's schema migrations (alembic)")
    actions = db.add_subparsers(dest="db_action", required=True)
    for name, help_text in (
        ("upgrade", "migrate the registry to this version's schema (in place; idempotent)"),
        ("current", "print the registry's schema revision (changes nothing)"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--data-dir")
        action.add_argument("--database-url", help="instead of the settings' database_url")
        action.add_argument("--config", type=Path, help="settings file (YAML or JSON)")
        action.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from server.db import migrate
    from server.db.engine import make_engine, redacted, sqlite_url
    from server.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            args.config, data_dir=args.data_dir, database_url=args.database_url
        )
        path = settings.data_path / "registry.sqlite3"
        url = settings.database_url
        if url is None and args.db_action == "current" and not path.is_file():
            print(f"none (no registry at {path})")
            return 0
        if url is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = make_engine(url or sqlite_url(path))
    except (SettingsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = str(path) if url is None else redacted(url)
    try:
        if args.db_action == "upgrade":
            before = migrate.status(engine)
            after = migrate.upgrade(engine)
            print(f"{where}: {before.describe()} -> {after.describe()}")
        else:
            print(f"{where}: {migrate.status(engine).describe()}")
    except (migrate.MigrationError, sa.exc.SQLAlchemyError) as exc:
        reason = getattr(exc, "orig", None) or exc
        print(f"error: {where}: {reason}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0
