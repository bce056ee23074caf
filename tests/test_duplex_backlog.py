"""A duplex client that sends malformed frames and never reads: its error replies must not pile
up without bound. The session's outbound queue is bounded; with it full the server stops reading
the client for a grace period, then closes it with 4413. A client that reads is only slowed.

The client is a raw socket that reads nothing until the server has closed the session (a real
websockets client reads in the background). The kernel buffers a few MB of replies on loopback
first, so the flood is large: one-byte text frames, each answered by a 63-byte error. The server
stops reading the client once its queue is full, so it never works through the whole flood.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time

import httpx
import pytest

from tests.duplex_helpers import converse, user_audio, ws_url
from tests.service_helpers import server_process

MODEL = "pp-tiny"
MAX_OUTBOX, MAX_REPLIES = 8, 8
FLOOD = 300_000  # 2.1 MB on the wire, ~19 MB of replies: more than the kernel buffers


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_personaplex):
    settings = {
        "data_dir": str(tmp_path_factory.mktemp("duplex_backlog")),
        "models": {MODEL: {"path": str(tiny_personaplex), "family": "personaplex"}},
        "duplex_max_outbox_frames": MAX_OUTBOX,
        "duplex_max_unread_replies": MAX_REPLIES,
        "duplex_unread_grace_s": 1.0,
    }
    with server_process(settings) as url:
        yield url


def _masked(payload: bytes, opcode: int = 0x2) -> bytes:
    mask = b"\x0f\x1e\x2d\x3c"
    assert len(payload) < 126
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def _open(url: str) -> tuple[socket.socket, bytes]:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.settimeout(60)
    sock.connect((host, int(port)))
    sock.sendall(
        (
            f"GET /duplex?speaker={MODEL} HTTP/1.1\r\nHost: {host}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the server closed during the upgrade"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"101", head
    return sock, rest


def _flood(sock: socket.socket, frames: bytes) -> int:
    """Send as much of `frames` as the server takes, never reading; stop once it has taken
    nothing for two seconds (it stopped reading). Returns the bytes sent."""
    sock.setblocking(False)
    sent = 0
    while sent < len(frames):
        _, writable, _ = select.select([], [sock], [], 2.0)
        if not writable:
            break
        try:
            sent += sock.send(frames[sent : sent + 65536])
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            break  # the server closed the connection
    sock.setblocking(True)
    sock.settimeout(60)
    return sent


def _read_frames(sock: socket.socket, buffered: bytes, most: int) -> tuple[list, int | None, str]:
    """Server frames until its close frame (or `most` data frames, or the end): the data
    messages, the close code and reason."""
    data, messages = buffered, []
    while len(messages) < most:
        while len(data) >= 2:
            opcode, size, start = data[0] & 0x0F, data[1] & 0x7F, 2
            if size == 126:
                if len(data) < 4:
                    break
                size, start = struct.unpack(">H", data[2:4])[0], 4
            elif size == 127:
                if len(data) < 10:
                    break
                size, start = struct.unpack(">Q", data[2:10])[0], 10
            if len(data) < start + size:
                break
            payload, data = data[start : start + size], data[start + size :]
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                return messages, code, payload[2:].decode("utf-8", "replace")
            messages.append(payload)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return messages, None, ""


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    (line,) = [ln for ln in text.splitlines() if ln.split(" ")[0] == name]
    return float(line.rsplit(" ", 1)[1])


def _closed_unread(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    name = 'voicefoundry_duplex_closed_total{code="4413"}'
    lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_a_client_that_never_reads_is_closed_and_its_queue_stays_bounded(server):
    sock, buffered = _open(server)
    try:
        sent = _flood(sock, _masked(b"x", opcode=0x1) * FLOOD)
        # Read nothing until the server gave up on this client (it used to answer every frame,
        # holding whatever the socket could not take in its queue).
        deadline = time.monotonic() + 120
        while not _closed_unread(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        messages, code, reason = _read_frames(sock, buffered, most=FLOOD + 2)
    finally:
        sock.close()
    errors = [m for m in messages if m[:1] == b"\x05"]
    assert code == 4413, (code, reason, len(errors), sent)
    assert "too many unread messages" in reason
    # It was answered until its queue was full, then stopped: far fewer replies than frames.
    assert 0 < len(errors) < FLOOD
    # The queue held at most its bound at any time; the close is counted; the server serves on.
    assert _metric(server, "voicefoundry_duplex_outbox_peak") <= MAX_OUTBOX + MAX_REPLIES
    assert _metric(server, 'voicefoundry_duplex_closed_total{code="4413"}') == 1
    deadline = time.monotonic() + 30
    while _metric(server, "voicefoundry_duplex_sessions") != 0:
        assert time.monotonic() < deadline, "the closed session was not freed"
        time.sleep(0.2)
    assert httpx.get(f"{server}/readyz", timeout=30).status_code == 200


def test_a_client_that_reads_gets_every_reply_to_a_burst(server):
    """A burst of pings far over the queue's bound, from a client reading as it goes: every
    ping is answered, nothing is closed (the server reads its messages at its reading pace)."""
    burst = 20 * (MAX_OUTBOX + MAX_REPLIES)
    talk = asyncio.run(
        converse(
            ws_url(server, speaker=MODEL),
            before=[b"\x06"] * burst + [b"\x09"],
            audio=user_audio(0.8),
            min_audio_frames=5,
        )
    )
    assert talk.kinds.count(0x06) == burst
    assert len(talk.errors) == 1 and len(talk.audio) >= 5
    assert talk.close_code != 4413
