"""Memory and connections on a real `voicefoundry serve`: request bodies and headers read within
a time limit (slowloris: 20 uploads sending a byte every 10 s were never closed), a bounded
number of uploads at once (the slot given back however a request ends), and an upload never held
whole in memory (a 192 MiB upload does not raise the server's peak RSS by its size).

Raw sockets on 127.0.0.1 play the stalling clients; the timeouts are set small so the tests are
quick, and every wait is bounded by a generous socket timeout, never asserted as a duration."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.voices import pack_directory
from tests.service_helpers import SERVER_PIDS, server_process

WAIT_S = 60.0  # the longest any socket read waits; the server answers within seconds
MIB = 1 << 20
DATA_DIRS: dict[str, Path] = {}  # a server's URL -> its data dir


@pytest.fixture(scope="module")
def quick_timeouts(tmp_path_factory, tiny_qwen3_base) -> Iterator[str]:
    data = tmp_path_factory.mktemp("quick")
    settings = {
        "data_dir": str(data / "data"),
        "models": {"tiny": {"path": str(tiny_qwen3_base)}},
        "body_read_timeout_s": 1.0,
        "body_total_timeout_s": 3.0,
        "header_read_timeout_s": 1.0,
        "keep_alive_timeout_s": 1.0,
        "shutdown_grace_s": 2,
    }
    with server_process(settings) as url:
        DATA_DIRS[url] = data / "data"
        yield url


@pytest.fixture(scope="module")
def two_uploads(tmp_path_factory, tiny_qwen3_base) -> Iterator[str]:
    data = tmp_path_factory.mktemp("capped")
    settings = {
        "data_dir": str(data / "data"),
        "models": {"tiny": {"path": str(tiny_qwen3_base)}},
        "max_concurrent_uploads": 2,
        "body_read_timeout_s": 120.0,
        "shutdown_grace_s": 2,
    }
    with server_process(settings) as url:
        yield url


def _connect(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by WAIT_S)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _stalled_upload(url: str, path: str = "/voices/import") -> socket.socket:
    """A multipart upload whose headers and first body bytes arrive, then nothing."""
    sock = _connect(url)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n"
        "Content-Length: 100000\r\n\r\n--xyz\r\n".encode()
    )
    return sock


def test_a_stalled_request_body_is_answered_408_and_closed(quick_timeouts, tmp_path):
    sock = _stalled_upload(quick_timeouts)
    with sock:
        raw = _read_until_closed(sock)
    assert _status(raw) == 408, raw[:300]
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/problem+json" in head.lower() and b"connection: close" in head.lower()
    assert b"body_read_timeout_s" in body
    assert httpx.get(f"{quick_timeouts}/healthz", timeout=WAIT_S).status_code == 200
    uploads = list(DATA_DIRS[quick_timeouts].glob("voices/.upload-*"))
    assert uploads == []  # the partial upload's folder was removed


def test_a_body_dribbled_byte_by_byte_is_cut_off_by_the_total_limit(quick_timeouts):
    """One byte every 0.3 s never trips the 1 s wait for the next bytes, only the total 3 s."""
    sock = _connect(quick_timeouts)
    with sock:
        sock.sendall(
            b"POST /speak HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n"
        )
        sock.settimeout(0.3)
        raw = b""
        for _ in range(100):  # 30 s of dribbling at most
            try:
                raw = sock.recv(65536)
                break
            except TimeoutError:
                sock.sendall(b" ")
        sock.settimeout(WAIT_S)
        raw += _read_until_closed(sock)
    assert raw, "the server never answered the dribbling client"
    assert _status(raw) == 408, raw[:300]


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /voices/import HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form"],
    ids=["nothing", "half-the-headers"],
)
def test_a_connection_whose_headers_stall_is_closed(quick_timeouts, sent):
    sock = _connect(quick_timeouts)
    with sock:
        sock.sendall(sent)
        assert _read_until_closed(sock) == b""  # closed by the server, without a response


def _garbage_import(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/voices/import",
        files={"package": ("p.tar.gz", b"not an archive", "application/octet-stream")},
        timeout=WAIT_S,
    )


def _until(url: str, predicate: Callable[[httpx.Response], bool]) -> httpx.Response:
    """Import garbage until `predicate(answer)` (100 tries): the gate as the server sees it."""
    answer = _garbage_import(url)
    for _ in range(100):
        if predicate(answer):
            break
        time.sleep(0.1)
        answer = _garbage_import(url)
    return answer


def test_concurrent_uploads_are_capped_and_their_slots_come_back(two_uploads, voice_package):
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(_stalled_upload(two_uploads))
        second = stack.enter_context(_stalled_upload(two_uploads, "/voices"))
        refused = _until(two_uploads, lambda a: a.status_code == 503)
        assert refused.status_code == 503, refused.text[:300]
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert int(refused.headers["retry-after"]) > 0
        assert "max_concurrent_uploads" in refused.json()["detail"]

        first.close()  # a client that goes away gives its slot back
        answer = _until(two_uploads, lambda a: a.status_code != 503)
        assert answer.status_code == 400, answer.text[:300]
        # Refused uploads (errors) give theirs back too: one slot is free, time after time.
        assert [_garbage_import(two_uploads).status_code for _ in range(4)] == [400] * 4
        # And so does a completed one.
        created = httpx.post(
            f"{two_uploads}/voices/import",
            files={"package": ("p.tar.gz", pack_directory(voice_package), "application/gzip")},
            data={"name": "slotted"},
            timeout=WAIT_S,
        )
        assert created.status_code == 201, created.text[:300]
        assert _garbage_import(two_uploads).status_code == 400
        second.close()
    assert _until(two_uploads, lambda a: a.status_code != 503).status_code == 400


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_large_upload_is_never_held_whole_in_memory(two_uploads, tmp_path):
    pid = SERVER_PIDS[two_uploads]
    size = 192 * MIB
    big = tmp_path / "big.wav"
    with big.open("wb") as handle:
        handle.truncate(size)  # sparse: cheap for the test, real bytes on the wire
    assert httpx.get(f"{two_uploads}/voices", timeout=WAIT_S).status_code == 200
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = _peak_rss(pid)
    with big.open("rb") as clip:
        answer = httpx.post(
            f"{two_uploads}/voices/import",
            files={
                "package": ("p.tar.gz", b"not an archive", "application/octet-stream"),
                "ref_clip": ("ref.wav", clip, "audio/wav"),
            },
            timeout=WAIT_S * 4,
        )
    assert answer.status_code == 400, answer.text[:300]
    grown = _peak_rss(pid) - before
    assert grown < size // 4, (
        f"peak RSS grew by {grown / MIB:.0f} MiB for a {size // MIB} MiB upload"
    )
