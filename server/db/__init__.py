"""The registry's database layer: tables, engines, migrations.

Choice: plain SQLAlchemy 2 Core with alembic, not advanced-alchemy. The registry is a small
synchronous interface (`server.registry.Registry`: dataclass records, one `transaction()` that
nested calls join) called from anyio worker threads, the CLI, backups and the job service;
advanced-alchemy's value is async ORM repositories and services wired into Litestar's request
scope, which would mean rewriting every caller for no gain here, and its migrations are alembic
anyway. Core keeps each statement explicit: the dialect-specific upserts, the partial unique
index on (base_model, slot) and the conflict handling of slot allocation read as what they do.

SQLite (a file in the data dir) stays the embedded default; ``database_url:
postgresql+psycopg://...`` puts the same tables in PostgreSQL.
"""
