"""Replicas behind a load balancer: requests/s and latency through one vs two `voicefoundry
serve` replicas behind nginx (and one replica direct, for nginx's own cost), measured side by
side in one run, and the 2-vs-1 ratios.

The replicas share one PostgreSQL database (a fresh one, dropped at the end) and one artifacts
dir, each with its own data dir. The voice is an instant clone created through replica A; the
one-replica configurations use only replica B (A stays up, idle), so B serves a voice it learnt
from the database.
The load is closed-loop: C clients (httpx, one process with the load balancer and the replicas)
each POST /speak, wait for the whole WAV, and send the next, for --seconds per configuration.
On a 2-core machine one replica already uses both cores: two replicas (and nginx and the
clients) compete for the same cores, so the 2-vs-1 ratio is bounded by the CPU, not the design.

Needs nginx (bash deploy/install-deploy-checks.sh) and PostgreSQL (bash deploy/start-postgres.sh;
VF_TEST_POSTGRES: another server's URL, a role that may create databases).

    python tests/bench/bench_replicas.py [--seconds 10] [--concurrency 1,4,8] [--text "..."]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import finetune  # noqa: F401, E402  (BLAS before mlx)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import sqlalchemy as sa  # noqa: E402

# The server deploy/start-postgres.sh starts (tests/conftest.py uses the same one).
POSTGRES_SERVER = "postgresql+psycopg://voicefoundry:voicefoundry@127.0.0.1:5432/postgres"
MODEL = "tiny"
VOICE = "bench-clone"
START_TIMEOUT_S = 300.0
VOICE_BOUND_S = 30.0


def fail(reason: str) -> None:
    print(f"error: {reason}", file=sys.stderr)
    raise SystemExit(2)


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else ""
    )
    if not found:
        fail("nginx is not installed: bash deploy/install-deploy-checks.sh")
    return found


def postgres_admin() -> sa.Engine:
    server = sa.make_url(os.environ.get("VF_TEST_POSTGRES", POSTGRES_SERVER))
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as exc:
        reason = " ".join(str(exc.orig).split())
        fail(f"PostgreSQL is not reachable: bash deploy/start-postgres.sh ({reason})")
    return admin


@contextlib.contextmanager
def fresh_database(admin: sa.Engine) -> Iterator[str]:
    name = f"vf_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process_group(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group; the whole group is stopped (TERM, then KILL) at exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            yield proc
        finally:
            for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, probe: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited: {log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{probe}", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}{probe} not ready: {log.read_text()[-3000:]}")
        time.sleep(0.3)


def replica_command(config: Path) -> list[str]:
    """`voicefoundry serve` (the venv's console script; `python -m server` where there is none)."""
    script = Path(sys.executable).with_name("voicefoundry")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "server"]
    return [*head, "serve", "--config", str(config)]


NGINX_CONF = """\
{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format upstream '$server_port $upstream_addr $status';
    access_log {tmp}/access.log upstream;
{servers}
}}
"""

NGINX_SERVER = """\
    upstream {name} {{
        least_conn;
{upstreams}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location = /lb-healthz {{ return 200 "ok\\n"; }}
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
"""


def nginx_config(tmp: Path, balancers: dict[int, list[str]]) -> Path:
    """One nginx, one listening port per balancer (port -> its replicas' host:port)."""
    servers = "".join(
        NGINX_SERVER.format(
            name=f"pool{port}",
            port=port,
            upstreams="\n".join(f"        server {u};" for u in upstreams),
        )
        for port, upstreams in balancers.items()
    )
    conf = tmp / "nginx.conf"
    # A root master would run its workers as `nobody`, who cannot reach the temp dir.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, servers=servers))
    return conf


def upstream_counts(tmp: Path, port: int, offset: int) -> Counter[str]:
    """Requests nginx passed on from `port` since byte `offset` of its access log, by replica."""
    data = (tmp / "access.log").read_bytes()
    counts: Counter[str] = Counter()
    for line in data[offset:].decode().splitlines():
        listen, upstream, _ = line.split(" ", 2)
        if int(listen) == port:
            counts[upstream] += 1
    return counts


def ref_clip(seconds: float = 2.0) -> bytes:
    """A voiced-like clip (a wavering tone with noise), 24 kHz mono WAV: the clone's reference."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 24_000)) / 24_000
    tone = 0.3 * np.sin(2 * np.pi * (140 + 20 * np.sin(3 * t)) * t)
    buffer = io.BytesIO()
    audio = (tone + 0.02 * rng.normal(size=t.size)).astype(np.float32)
    sf.write(buffer, audio, 24_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@dataclass
class Result:
    latencies: list[float]
    wall_s: float
    errors: int

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall_s

    def quantile(self, q: float) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[round(q * 100) - 1]


async def closed_loop(url: str, body: dict, clients: int, seconds: float) -> Result:
    """`clients` loops, each POST /speak then the next, until `seconds` have passed (a request
    under way then is finished and counted)."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def loop(index: int) -> None:
            nonlocal errors
            seed = index * 100_000
            while time.perf_counter() < deadline:
                seed += 1
                sent = time.perf_counter()
                answer = await client.post("/speak", json={**body, "seed": seed})
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1

        await asyncio.gather(*(loop(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return Result(latencies, wall, errors)


def wait_for_voice(url: str, body: dict) -> float:
    """Seconds until `url` speaks the voice (made on the other replica)."""
    start = time.monotonic()
    while True:
        answer = httpx.post(f"{url}/speak", json=body, timeout=120)
        took = time.monotonic() - start
        if answer.status_code == 200:
            return took
        if took > VOICE_BOUND_S:
            raise RuntimeError(f"{url} still answers {answer.status_code}: {answer.text[:300]}")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per configuration and C")
    parser.add_argument("--concurrency", default="1,4,8", help="closed-loop clients, e.g. 1,4,8")
    parser.add_argument("--text", default="Good morning, and welcome.")
    parser.add_argument("--frames", type=int, default=10, help="max_tokens of each request")
    parser.add_argument("--no-direct", action="store_true", help="leave out 1 replica direct")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        fail("--concurrency: a comma-separated list of positive integers")

    nginx = nginx_binary()
    admin = postgres_admin()
    # SIGTERM unwinds like Ctrl-C, so every `finally` below stops its processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.perf_counter()
    load_before = os.getloadavg()[0]

    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    body = {"speaker": VOICE, "text": args.text, "max_tokens": args.frames}
    results: dict[tuple[str, int], Result] = {}
    splits: dict[int, Counter[str]] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="vf-bench-replicas-") as folder,
            fresh_database(admin) as database_url,
            contextlib.ExitStack() as stack,
        ):
            root = Path(folder)
            model = make_tiny_qwen3_tts(root / "model", seed=0)
            urls: dict[str, str] = {}
            starting = []
            for name in ("a", "b"):
                port = free_port()
                settings = {
                    "host": "127.0.0.1",
                    "port": port,
                    "data_dir": str(root / name),
                    "artifacts_dir": str(root / "shared"),
                    "database_url": database_url,
                    "models": {MODEL: {"path": str(model)}},
                }
                config = root / f"{name}.json"
                config.write_text(json.dumps(settings))
                log = root / f"{name}.log"
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                proc = stack.enter_context(process_group(replica_command(config), log, env))
                urls[name] = f"http://127.0.0.1:{port}"
                starting.append((urls[name], proc, log))
            for url, proc, log in starting:  # both start at once (the migration is locked)
                wait_ready(url, proc, log, "/readyz")

            lb = root / "nginx"
            lb.mkdir()
            one_port, two_port = free_port(), free_port()
            hosts = {n: u.removeprefix("http://") for n, u in urls.items()}
            conf = nginx_config(lb, {one_port: [hosts["b"]], two_port: [hosts["a"], hosts["b"]]})
            command = [nginx, "-p", str(lb), "-e", str(lb / "error.log"), "-c", str(conf)]
            proc = stack.enter_context(
                process_group([*command, "-g", "daemon off;"], lb / "stdout.log")
            )
            for port in (one_port, two_port):
                wait_ready(f"http://127.0.0.1:{port}", proc, lb / "error.log", "/lb-healthz")

            made = httpx.post(
                f"{urls['a']}/voices",
                data={"name": VOICE, "strategy": "clone"},
                files={"ref": ("ref.wav", ref_clip(), "audio/wav")},
                timeout=120,
            )
            if made.status_code != 201:
                raise RuntimeError(f"clone on A: {made.status_code} {made.text[:300]}")
            on_b_s = wait_for_voice(urls["b"], {**body, "seed": 0})
            for url in urls.values():  # warm both replicas (first requests compile)
                asyncio.run(closed_loop(url, body, max(levels), 2.0))
            set_up_s = time.perf_counter() - began

            configs = {"2 replicas, nginx": f"http://127.0.0.1:{two_port}"}
            configs["1 replica, nginx"] = f"http://127.0.0.1:{one_port}"
            if not args.no_direct:
                configs["1 replica, direct"] = urls["b"]
            for clients in levels:
                for label, url in configs.items():
                    offset = (lb / "access.log").stat().st_size
                    results[label, clients] = asyncio.run(
                        closed_loop(url, body, clients, args.seconds)
                    )
                    if url.endswith(f":{two_port}"):
                        splits[clients] = upstream_counts(lb, two_port, offset)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        admin.dispose()

    cpus = os.cpu_count() or 1
    names = {hosts["a"]: "A", hosts["b"]: "B"}
    print(
        f"tiny qwen3_tts, POST /speak {args.text!r} ({args.frames} frames, WAV), closed loop, "
        f"{args.seconds:g} s a configuration; {cpus} CPU cores, load {load_before:.1f} "
        f"at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"voice: an instant clone made through replica A; B answered it 200 {on_b_s:.2f} s after "
        "(that first request included); "
        f"'1 replica' is B; set-up {set_up_s:.0f} s"
    )
    print(f"{'configuration':<20} {'C':>3} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'n':>5}")
    for clients in levels:
        for label in configs:
            r = results[label, clients]
            extra = f"  errors {r.errors}" if r.errors else ""
            if label.startswith("2 "):
                split = splits.get(clients, Counter())
                served = sorted((names.get(u, u), n) for u, n in split.items())
                extra += "  (" + ", ".join(f"{name} {n}" for name, n in served) + ")"
            print(
                f"{label:<20} {clients:>3} {r.rps:>8.2f} {r.quantile(0.5) * 1e3:>8.0f} "
                f"{r.quantile(0.95) * 1e3:>8.0f} {len(r.latencies):>5}{extra}"
            )
    print("2 replicas / 1 replica behind nginx (req/s: higher is better; p95: lower is better)")
    for clients in levels:
        two, one = results["2 replicas, nginx", clients], results["1 replica, nginx", clients]
        p95 = two.quantile(0.95) / one.quantile(0.95)
        line = f"  C={clients:<3} req/s x{two.rps / one.rps:.2f}   p95 x{p95:.2f}"
        if not args.no_direct:
            direct = results["1 replica, direct", clients]
            overhead = one.quantile(0.5) / direct.quantile(0.5)
            line += f"   nginx overhead (1 replica, p50) x{overhead:.2f}"
        print(line)
    if cpus <= 2:
        print(
            f"({cpus} cores: one replica already fills them; the two replicas, nginx and the "
            "clients compete for the same cores, so the ratio is bounded by the CPU: expect ~1x "
            "here, and the gain with replicas on separate hosts or cores)"
        )
    else:
        print(
            f"({cpus} cores: replicas, nginx and the clients share them; the CPU bounds the ratio)"
        )
    print(f"wall time {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
