"""The deploy files (deploy/) read by the tools that will run them: a Compose implementation
(`docker-compose config`), nginx (`nginx -t`, then nginx in front of a real server),
`systemd-analyze verify`, plistlib; their commands parsed by the real `voicefoundry` parser; the
health-check commands run against a real server; and SIGTERM to `voicefoundry serve` in the
middle of a streamed /speak. The tools come from deploy/install-deploy-checks.sh (`make test`
runs it). Image builds need a container engine and are not run here."""

from __future__ import annotations

import contextlib
import json
import os
import plistlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.service_helpers import ROOT, free_port

DEPLOY = ROOT / "deploy"
INSTALL = "run `bash deploy/install-deploy-checks.sh` (`make test` runs it)"
VOICEFOUNDRY = Path(sys.executable).parent / "voicefoundry"  # the venv's console script
UNIT_BIN = "/opt/voicefoundry/.venv/bin/voicefoundry"  # where the units expect the install


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"`{name}` is not installed: {INSTALL}")
    return found


def _parses(argv: list[str]) -> None:
    """`argv` (after the program) is a valid `voicefoundry` command line."""
    from server.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert argv[0] in commands, f"`voicefoundry {argv[0]}` is not a command"
    build_parser().parse_args(argv)  # exits (SystemExit 2) on an unknown option


def _unit(path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            current[key] = value
    return sections


def _timeout_stop_s() -> float:
    return float(_unit(DEPLOY / "systemd" / "voicefoundry.service")["Service"]["TimeoutStopSec"])


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    if args.startswith("CMD "):
        args = args[4:]
    value = json.loads(args)
    assert isinstance(value, list), args
    return value


# --- compose ----------------------------------------------------------------------------------
def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("docker-compose"), "-f", str(DEPLOY / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"} | env,
    )


def test_compose_file_is_valid_and_wires_replicas_and_balancer():
    from server.settings import Settings

    done = _compose_config({"POSTGRES_PASSWORD": "check-only"})
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "api-a", "api-b", "worker", "nginx"}
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"

    a, b, worker = services["api-a"], services["api-b"], services["worker"]
    env = a["environment"]
    assert env == b["environment"] == worker["environment"]
    assert env["VOICEFOUNDRY_JOB_RUNNER"] == "workers"  # the replicas queue, the worker trains
    assert env["VOICEFOUNDRY_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["VOICEFOUNDRY_DATABASE_URL"]
    # load_settings ignores an environment variable that names no setting: none may be a typo.
    unknown = [
        k for k in env if k.removeprefix("VOICEFOUNDRY_").lower() not in Settings.__struct_fields__
    ]
    assert not unknown, f"not Settings fields (yet?): {unknown}"
    artifacts = f"artifacts:{env['VOICEFOUNDRY_ARTIFACTS_DIR']}:rw"
    assert env["VOICEFOUNDRY_ARTIFACTS_DIR"].startswith("/")
    for service in (a, b, worker):
        assert artifacts in service["volumes"]
        assert service["stop_signal"] == "SIGTERM"
        assert service["stop_grace_period"] == f"{_timeout_stop_s():g}s"
        assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}
        _parses(service["command"])
    assert a["command"][0] == b["command"][0] == "serve"
    assert worker["command"][0] == "worker"
    assert len({str(s["volumes"]) for s in (a, b, worker)}) == 3  # own data dirs, one artifacts
    for replica in (a, b):
        assert "/readyz" in replica["healthcheck"]["test"][-1]
    assert services["nginx"]["depends_on"] == {
        "api-a": {"condition": "service_healthy"},
        "api-b": {"condition": "service_healthy"},
    }
    assert any(v.endswith(":/etc/nginx/nginx.conf:ro") for v in services["nginx"]["volumes"])


def test_compose_refuses_to_start_without_a_database_password():
    done = _compose_config({})
    assert done.returncode != 0 and "set POSTGRES_PASSWORD" in done.stderr, done.stderr


# --- nginx ------------------------------------------------------------------------------------
def _nginx_conf(tmp: Path, upstream: str, listen: str = "80") -> Path:
    """deploy/nginx.conf with the replicas at `upstream` (compose's names resolve only inside its
    network), listening on `listen`, its pid file under `tmp`; nothing else changed."""
    text = (DEPLOY / "nginx.conf").read_text()
    text, n = re.subn(r"server api-[ab]:8000", f"server {upstream}", text)
    assert n == 2
    text = text.replace("listen 80;", f"listen {listen};")
    text, n = re.subn(r"^pid [^;]*;", f"pid {tmp}/nginx.pid;", text, flags=re.M)
    assert n == 1
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


def _nginx(conf: Path, *args: str) -> list[str]:
    return [
        _tool("nginx"),
        "-p",
        str(conf.parent),
        "-e",
        str(conf.parent / "error.log"),
        "-c",
        str(conf),
        *args,
    ]


def test_nginx_conf_passes_nginx_t_and_matches_the_server(tmp_path):
    from server.app import create_app
    from server.settings import Settings, load_settings

    done = subprocess.run(
        _nginx(_nginx_conf(tmp_path, "127.0.0.1:8000"), "-t"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "test is successful" in done.stderr, done.stderr

    text = (DEPLOY / "nginx.conf").read_text()
    size = re.search(r"client_max_body_size (\d+)m;", text)
    assert size and int(size[1]) * 1024 * 1024 == Settings().max_upload_bytes
    example = load_settings(DEPLOY / "voicefoundry.yaml")
    assert example.max_upload_bytes == Settings().max_upload_bytes
    assert example.readyz_auth == "none"
    sockets = {"/duplex", "/api/chat", "/speak/stream"}
    assert sockets <= set(re.findall(r"location = (\S+) \{", text))
    paths = {route.path for route in create_app(Settings()).routes}
    assert sockets <= paths  # the upgraded locations are the server's WebSocket routes
    assert "proxy_buffering off;" in text and "Upgrade $http_upgrade" in text


# --- systemd and launchd ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["voicefoundry.service", "voicefoundry-worker.service"])
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path, name):
    """Verified as a copy whose ExecStart names this venv's `voicefoundry`: verify refuses a
    binary that does not exist, and /opt/voicefoundry is where a host installs it."""
    from server.settings import Settings

    unit = DEPLOY / "systemd" / name
    text = unit.read_text()
    assert text.count(UNIT_BIN) == 1
    (tmp_path / name).write_text(text.replace(UNIT_BIN, str(VOICEFOUNDRY)))
    done = subprocess.run(
        [_tool("systemd-analyze"), "verify", "--man=no", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown keys and bad values are only warnings (exit 0): any output fails.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stderr

    service = _unit(unit)["Service"]
    assert service["Type"] == "exec"  # the server does not speak sd_notify
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes" and service["User"] == "voicefoundry"
    data = "/var/lib/voicefoundry"
    assert data in service["ReadWritePaths"].split() and service["WorkingDirectory"] == data
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == UNIT_BIN
    _parses(argv[1:])
    assert argv[1] == ("worker" if "worker" in name else "serve")
    # The longest graceful stop: requests in flight, a running job, then each engine finishing
    # its batch and its cancelled work, each bounded by shutdown_grace_s (server/startup.py).
    assert float(service["TimeoutStopSec"]) > 6 * Settings().shutdown_grace_s


@pytest.mark.parametrize("command", ["server", "worker"])
def test_launchd_plist_parses_and_runs_the_real_command(command):
    path = DEPLOY / "launchd" / f"com.voicefoundry.{command}.plist"
    with path.open("rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == path.stem
    program = plist["ProgramArguments"]
    assert Path(program[0]).name == "voicefoundry" and Path(program[0]).is_absolute()
    _parses(program[1:])
    assert program[1] == {"server": "serve", "worker": "worker"}[command]
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # a SIGTERM stop (exit 0) stays down
    assert plist["ExitTimeOut"] == _timeout_stop_s()


# --- Dockerfiles ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_runs_serve_as_a_user_with_health_check_and_stop_signal(name):
    """What can be checked without an engine (no image is built here)."""
    steps = _dockerfile(DEPLOY / name)
    first = steps[0]
    assert first[0] == "FROM"
    if name == "Dockerfile":
        assert first[1] == "python:3.11-slim-bookworm"
    else:
        assert first[1].startswith("nvidia/cuda:") and "runtime" in first[1]
        assert any('"mlx[cuda]==' in args for word, args in steps if word == "RUN")
    assert any("libopenblas0-pthread" in args for word, args in steps if word == "RUN")
    users = [args for word, args in steps if word == "USER"]
    assert users == ["voicefoundry"]
    ignore = [
        line
        for line in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # only the sources named after it go into the build context
    kept = [line[1:] for line in ignore if line.startswith("!")]
    for word, args in steps:
        if word == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") in kept, f"COPY {source}: left out of the context"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for word, args in steps if word == "ENV")))
    assert json.loads(dict(steps)["VOLUME"]) == [env["VOICEFOUNDRY_DATA_DIR"]]
    assert dict(steps)["STOPSIGNAL"] == "SIGTERM"
    health = dict(steps)["HEALTHCHECK"]
    assert "/healthz" in health
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["voicefoundry"]
    _parses(json.loads(dict(steps)["CMD"]))


# --- against a real server --------------------------------------------------------------------
SPEECH = {"speaker": "vivian", "stream": True, "format": "pcm", "seed": 7}


@contextlib.contextmanager
def _serve(tmp: Path, model: Path, **settings: object) -> Iterator[tuple[subprocess.Popen, str]]:
    """`voicefoundry serve --config FILE` (the console script the units and images run) on
    127.0.0.1; yields the process and its URL once /readyz answers 200."""
    port = free_port()
    config = tmp / "settings.json"
    base = {"data_dir": str(tmp / "data"), "host": "127.0.0.1", "port": port}
    config.write_text(json.dumps(base | {"models": {"m": {"path": str(model)}}} | settings))
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [str(VOICEFOUNDRY), "serve", "--config", str(config)],
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{url}/readyz"):
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _health_commands() -> dict[str, list[str]]:
    """The Dockerfile's HEALTHCHECK and compose's replica healthcheck, exactly as written."""
    health = dict(_dockerfile(DEPLOY / "Dockerfile"))["HEALTHCHECK"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    readyz = compose["services"]["api-a"]["healthcheck"]["test"]
    assert readyz[0] == "CMD"
    return {"/healthz": _exec_form(health[health.index("CMD ") :]), "/readyz": readyz[1:]}


def _speak(url: str, body: dict) -> bytes:
    with httpx.stream("POST", f"{url}/speak", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return b"".join(r.iter_bytes())


def test_a_real_server_behind_nginx_then_stopped_by_sigterm(tmp_path, tiny_qwen3_custom):
    """One `voicefoundry serve`: the images' health checks pass against it (and fail against a
    closed port); nginx (deploy/nginx.conf) in front of it streams /speak byte for byte and
    upgrades /speak/stream; then SIGTERM while a streamed /speak is in flight."""
    # One codec frame per chunk, so a stream is still going when its first chunk arrives;
    # shutdown_grace_s (the most a request in flight is given) is raised so that a loaded
    # machine does not cut the stream.
    grace = 30
    settings = {"stream_chunk_frames": 1, "shutdown_grace_s": grace}
    with _serve(tmp_path, tiny_qwen3_custom, **settings) as (proc, url):
        _check_health_commands(url)
        body = SPEECH | {"text": "A graceful stop lets this sentence finish.", "max_tokens": 4}
        reference = _speak(url, body)
        _check_behind_nginx(tmp_path, url, body, reference)
        _check_sigterm(tmp_path, proc, url, body, reference, grace)


def _check_health_commands(url: str) -> None:
    port = url.rsplit(":", 1)[1]
    for path, command in _health_commands().items():
        assert command[0] == "python"
        argv = [sys.executable, *command[1:]]
        for probe_port, ok in ((port, True), (str(free_port()), False)):
            env = {**os.environ, "VOICEFOUNDRY_PORT": probe_port}
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
            assert (done.returncode == 0) is ok, (path, probe_port, done.stderr)


def _check_behind_nginx(tmp: Path, url: str, body: dict, reference: bytes) -> None:
    from websockets.sync.client import connect

    lb_port = free_port()
    conf = _nginx_conf(tmp, url.removeprefix("http://"), listen=f"127.0.0.1:{lb_port}")
    nginx = subprocess.Popen(_nginx(conf, "-g", "daemon off;"), stderr=subprocess.PIPE)
    lb = f"http://127.0.0.1:{lb_port}"
    try:
        deadline = time.monotonic() + 20
        while not _answers(f"{lb}/lb-healthz"):
            assert nginx.poll() is None, nginx.stderr.read() if nginx.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(f"{lb}/readyz", timeout=10).json()["status"] == "ready"
        compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
        check = compose["services"]["nginx"]["healthcheck"]["test"]
        assert check[:3] == ["CMD", "bash", "-c"] and "/dev/tcp/127.0.0.1/80 " in check[3]
        for port, ok in ((lb_port, True), (free_port(), False)):  # as written, but the port
            script = check[3].replace("/dev/tcp/127.0.0.1/80 ", f"/dev/tcp/127.0.0.1/{port} ")
            done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=30)
            assert (done.returncode == 0) is ok, (port, done.stderr)
        assert _speak(lb, body) == reference  # streamed through, byte for byte
        ws = lb.replace("http://", "ws://") + "/speak/stream"
        first = {"voice": "vivian", "format": "pcm", "max_tokens": 2, "seed": 1}
        with connect(ws, open_timeout=10) as socket:  # the upgrade went through nginx
            socket.send(json.dumps(first | {"text": "Hello there.", "close": True}))
            audio, done = 0, None
            while done is None:
                message = socket.recv(timeout=60)
                if isinstance(message, bytes):
                    audio += len(message)
                elif json.loads(message)["type"] == "done":
                    done = json.loads(message)
        assert audio > 0 and done["usage"]["segments"] == 1
    finally:
        nginx.terminate()
        nginx.wait(30)


def _check_sigterm(
    tmp: Path, proc: subprocess.Popen, url: str, body: dict, reference: bytes, grace: float
) -> None:
    """The server takes no new connection, the stream in flight COMPLETES (the same bytes as
    the same seeded request before), and the process exits 0 within the unit's TimeoutStopSec."""
    received: list[bytes] = []
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{url}/speak", json=body, timeout=60) as r:
                for chunk in r.iter_bytes():
                    received.append(chunk)
        except BaseException as exc:  # reported below
            errors.append(exc)

    client = threading.Thread(target=stream)
    client.start()
    deadline = time.monotonic() + 30
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert received, "no audio before the SIGTERM"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    at_signal = sum(map(len, received))
    closed = time.monotonic() + 5
    while _answers(f"{url}/healthz"):  # the listener closes at once: no new connection
        assert time.monotonic() < closed, "still taking connections after the SIGTERM"
        time.sleep(0.05)
    code = proc.wait(_timeout_stop_s())
    stopped = time.monotonic() - sent
    client.join(10)
    assert not client.is_alive() and not errors, errors
    assert at_signal < len(reference), "the stream had finished before the SIGTERM"
    assert b"".join(received) == reference
    assert code == 0, (tmp / "server.log").read_text()[-2000:]
    assert stopped < grace < _timeout_stop_s(), stopped
