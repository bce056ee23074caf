"""Service settings: defaults, then a YAML/JSON file, then VOICEFOUNDRY_* environment variables."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from finetune.families import FAMILIES, unknown_family_message
from finetune.loading import hub_repo_id

import msgspec
import yaml

ENV_PREFIX = "VOICEFOUNDRY_"
# The key an operational route asks for while API keys are on: none, any key, an admin key.
RouteAuth = Literal["none", "speak", "admin"]
DEMO_MODEL = "qwen3-tiny"


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A local directory, or a hub id ("owner/name"): fetched into the hub cache on first start
    # (server/hub.py), only the files its family needs.
    path: str
    # A name in finetune.families.FAMILIES; its `engine` says which engine serves it.
    family: str = "qwen3_tts"
    # A hub id's pinned revision (a commit hash, or a tag / branch); None: the default branch,
    # with a warning naming the commit it resolved to.
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(unknown_family_message(self.family))
        if self.revision is not None and hub_repo_id(self.path) is None:
            raise ValueError(f"revision is for hub ids; {self.path!r} is a local path")


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "./data"
    # The registry's database (SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db); None:
    # the embedded SQLite file DATA_DIR/registry.sqlite3.
    database_url: str | None = None
    # Voice packages, uploads in flight and job folders (server/artifacts.py); None: the data
    # dir. Replicas sharing a database_url mount one artifacts dir (server/replicas.py).
    artifacts_dir: str | None = None
    # Replicas (database_url set): how often each one reconciles the voices it has installed
    # with the registry, besides the PostgreSQL notifications (server/replicas.py).
    replica_poll_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 2.0
    # Who trains fine-tune jobs: "server" (each server runs the jobs it accepted, as a child
    # process) or "workers" (`voicefoundry worker` processes claim them from the PostgreSQL
    # task queue; server/jobs/queue.py). "workers" needs a postgresql database_url.
    job_runner: Literal["server", "workers"] = "server"
    # Workers: jobs one worker trains at once; how often it tells the database it is alive; how
    # long silent before another worker takes its jobs back (from their last checkpoint).
    worker_concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    worker_heartbeat_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    worker_stalled_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # Workers: hosts each job of a data-parallel family trains on (mx.distributed ranks over
    # mlx.launch, reached by ssh; empty: this worker's host alone), and ranks per host.
    worker_hosts: list[str] = []
    worker_ranks_per_host: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    demo: bool = False
    models: dict[str, ModelSpec] = {}
    # None (left out): no auth. A file that is missing, unreadable or holds no keys: no start.
    api_keys_file: str | None = None
    # Where the API keys live: "file" (api_keys_file, above) or "database" (the registry's
    # database, one set for every replica: server/keystore_db.py; auth always on, and a
    # database without keys: no start).
    api_keys: Literal["file", "database"] = "file"
    metrics_auth: RouteAuth = "speak"
    schema_auth: RouteAuth = "speak"
    readyz_auth: RouteAuth = "none"  # load balancers probe it without a key
    cors_origins: list[str] = []
    max_queue: int = 64
    max_batch: int = 8
    # How the speech engine batches (server/engine/worker.py): "continuous" (a request joins the
    # running batch at the next decode step) or "rounds" (one segment of a batch at a time; kept
    # to measure against).
    engine_scheduler: Literal["continuous", "rounds"] = "continuous"
    batch_window_ms: float = 10.0
    max_text_chars: int = 5000
    max_tokens_per_sentence: int = 1024
    # Frames a request's audio is decoded in: streamed requests send each chunk as it is made
    # (the first audio is one prefill + this many frames away); a whole file is its chunks
    # joined, in bigger chunks (fewer passes: the vocoder's early stages read their weights
    # once a pass).
    stream_chunk_frames: Annotated[int, msgspec.Meta(ge=1, le=300)] = 6
    whole_chunk_frames: Annotated[int, msgspec.Meta(ge=1, le=300)] = 25
    # /speak/stream: text that has not ended a sentence is spoken after this long without a new
    # delta (a session may ask for less, never more: `flush_after_s` in its first message).
    speak_stream_flush_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    # Per-request budgets (None: none): the most audio one /speak request may make, and how long
    # after it is queued it may run. Over either, it is stopped: 413 / 503 problem+json, or a
    # streamed response that ends without its last chunk (logged, counted in /metrics).
    max_request_audio_seconds: Annotated[float, msgspec.Meta(gt=0)] | None = 900.0
    max_request_wall_seconds: Annotated[float, msgspec.Meta(gt=0)] | None = 900.0
    adapter_slots: int = 8
    adapter_max_rank: int = 32
    adapter_max_bytes: int = 512 * 1024 * 1024
    max_upload_bytes: int = 256 * 1024 * 1024
    max_json_bytes: int = 1024 * 1024  # a /speak body: text is bounded by max_text_chars anyway
    # A voice package archive, unpacked: all members together, any one member, how many members
    # (checked while each member streams out, before more than the cap is written).
    package_max_bytes: int = 2 * 1024 * 1024 * 1024
    package_max_member_bytes: int = 1024 * 1024 * 1024
    package_max_members: int = 256
    # Disk, upload and connection limits. Uploads, unpacked packages and job checkpoints are
    # refused (507) rather than leave less than this free on the data dir's disk (0: off).
    min_free_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 * 1024 * 1024
    max_concurrent_uploads: Annotated[int, msgspec.Meta(ge=1)] = 4  # more: 503 + Retry-After
    body_read_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0  # wait for a body's next bytes
    body_total_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 900.0  # a whole request body
    header_read_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # a request's headers
    keep_alive_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0  # an idle kept-alive socket
    shutdown_grace_s: float = 10.0
    job_concurrency: int = 1
    # Folders of failed / cancelled jobs are removed this long after they ended (None: kept).
    failed_job_retention_hours: float | None = 168.0
    # Least audio a fine-tune job takes; None: per strategy (speaker 4 s, language 8 s, duplex 4 s).
    job_min_total_seconds: float | None = None
    # Per-key usage (GET /usage) is written to the registry this often and at the stop.
    usage_flush_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    duplex_max_sessions: int = 8
    # The voice of a duplex session that names none (Kyutai's client sends no parameters);
    # None: the first PersonaPlex model loaded, as its own base voice.
    duplex_default_voice: str | None = None
    duplex_max_inbox_frames: int = 25  # 2 s of input queued before the oldest is dropped
    duplex_max_outbox_frames: int = 250  # 20 s of output a slow reader may fall behind
    # Error and pong replies a duplex client may leave unread (beyond the audio above). With
    # that many waiting, the server stops reading the client for up to duplex_unread_grace_s,
    # then closes the session with 4413 "too many unread messages".
    duplex_max_unread_replies: Annotated[int, msgspec.Meta(ge=1)] = 64
    duplex_unread_grace_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    # Debugging / test aid: append every generated segment's codec codes (and every duplex
    # session step's text token) to this JSON-lines file.
    codes_log: str | None = None

    def __post_init__(self) -> None:
        if self.job_runner == "workers" and not _is_postgresql(self.database_url):
            raise ValueError(
                "job_runner: workers needs a PostgreSQL database_url (the workers' task queue "
                "lives there); the embedded SQLite registry runs jobs in the server"
            )
        if self.worker_stalled_s <= self.worker_heartbeat_s:
            raise ValueError("worker_stalled_s must be longer than worker_heartbeat_s")
        if self.api_keys == "database" and self.api_keys_file is not None:
            raise ValueError(
                "api_keys: database keeps the keys in the registry's database; remove "
                "api_keys_file (move its keys with voicefoundry keys import --file FILE)"
            )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def artifacts_path(self) -> Path:
        if self.artifacts_dir is None:
            return self.data_path
        return Path(self.artifacts_dir).expanduser().resolve()


def _is_postgresql(url: str | None) -> bool:
    return url is not None and url.split(":", 1)[0].split("+", 1)[0] == "postgresql"


class SettingsError(ValueError):
    pass


def load_settings(file: Path | None = None, **overrides: Any) -> Settings:
    raw: dict[str, Any] = {}
    if file is not None:
        try:
            text = Path(file).read_text()
            raw = json.loads(text) if str(file).endswith(".json") else yaml.safe_load(text) or {}
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise SettingsError(f"{file}: {exc}") from exc
    for field in Settings.__struct_fields__:
        value = os.environ.get(ENV_PREFIX + field.upper())
        if value is not None:
            raw[field] = _parse_env(value)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid settings: {exc}") from exc


def _parse_env(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
