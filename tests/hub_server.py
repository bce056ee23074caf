"""A model hub on 127.0.0.1 for the download tests: the only stand-in they use.

No model hub is reachable from CI (and the tests never reach the network), so the real download
code (`huggingface_hub.snapshot_download` as server/hub.py calls it) is pointed at this server
with `HF_ENDPOINT`. It serves local directories as repositories under the endpoints that
huggingface_hub 2.x calls, with the headers it relies on:

- `GET /api/models/{repo}[/revision/{rev}]`: model info with the commit `sha` (RepoNotFound /
  RevisionNotFound as `X-Error-Code` otherwise);
- `GET /api/models/{repo}/tree/{rev}?recursive=...`: the file listing (size, git oid, LFS
  metadata for weights);
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag` (git blob sha1) or, for LFS
  files, `X-Linked-Etag` (sha256) and `X-Linked-Size`, `Content-Length`, `Accept-Ranges`; a GET
  with `Range: bytes=N-` answers 206 with `Content-Range`.

Every request is logged (`requests`). `hold(path, n)` sends the first n bytes of a file and then
waits until `release()`; `cut(path, n)` sends n bytes and drops the connection, once.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".wav")


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag -> commit


@dataclass(frozen=True)
class Logged:
    method: str
    path: str  # decoded: /api/models/..., /owner/name/resolve/REV/FILE
    range: str | None


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_from_dir(folder: Path, extra: dict[str, bytes] | None = None, seed: str = "") -> Repo:
    """Every file under `folder` (plus `extra`) as one commit; its sha from the contents."""
    files = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    files.update(extra or {})
    digest = hashlib.sha1(seed.encode())
    for name in sorted(files):
        digest.update(name.encode() + git_oid(files[name]).encode())
    commit = digest.hexdigest()
    return Repo(commit, files, {"main": commit})


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Logged] = []
        self._lock = threading.Lock()
        self._holds: dict[str, int] = {}
        self._cuts: dict[str, int] = {}
        self.released = threading.Event()
        self.held = threading.Event()  # set once a held transfer has sent its first bytes
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def hold(self, path: str, after: int) -> None:
        self._holds[path] = after

    def cut(self, path: str, after: int) -> None:
        self._cuts[path] = after

    def release(self) -> None:
        self.released.set()

    def log(self, entry: Logged) -> None:
        with self._lock:
            self.requests.append(entry)

    def resolved(self, method: str = "GET") -> list[Logged]:
        return [r for r in list(self.requests) if r.method == method and "/resolve/" in r.path]

    def fetched_files(self) -> set[str]:
        """The repository paths of every file a GET asked for."""
        return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.resolved()}


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        # --- routing ---------------------------------------------------------------------
        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.log(Logged(method, path, self.headers.get("Range")))
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if tree and method == "GET":
                self._tree(tree.group(1), tree.group(2))
            elif api and method == "GET":
                self._info(api.group(1), api.group(2) or "main")
            elif resolve:
                self._resolve(method, resolve.group(1), resolve.group(2), resolve.group(3))
            else:
                self._error(404, "EntryNotFound", f"no route {path}")

        def _repo(self, repo_id: str, revision: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            if revision != repo.commit and revision not in repo.refs:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo

        # --- endpoints -------------------------------------------------------------------
        def _info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id, revision)
            if repo is not None:
                siblings = [{"rfilename": name} for name in sorted(repo.files)]
                self._json({"id": repo_id, "sha": repo.commit, "siblings": siblings})

        def _tree(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            entries: list[dict[str, object]] = []
            folders = sorted({str(Path(n).parent) for n in repo.files} - {"."})
            for folder in folders:
                entries.append(
                    {
                        "type": "directory",
                        "oid": git_oid(folder.encode()),
                        "size": 0,
                        "path": folder,
                    }
                )
            for name, data in sorted(repo.files.items()):
                entry: dict[str, object] = {
                    "type": "file",
                    "oid": git_oid(data),
                    "size": len(data),
                    "path": name,
                }
                if name.endswith(LFS_SUFFIXES):
                    sha = hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, method: str, repo_id: str, revision: str, name: str) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            data = repo.files.get(name)
            if data is None:
                self._error(404, "EntryNotFound", f"{name} does not exist", commit=repo.commit)
                return
            start = 0
            asked = self.headers.get("Range")
            if asked:
                match = re.fullmatch(r"bytes=(\d+)-", asked.strip())
                assert match, f"unexpected Range {asked!r}"
                start = int(match.group(1))
            body = data[start:]
            self.send_response(206 if asked else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
            else:
                self.send_header("ETag", f'"{git_oid(data)}"')
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if method == "HEAD":
                return
            for piece in self._pieces(name, body):
                if piece is None:  # cut: drop the connection mid-body
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(piece)
                self.wfile.flush()

        def _pieces(self, name: str, body: bytes) -> Iterator[bytes | None]:
            cut = hub._cuts.pop(name, None)
            if cut is not None:
                yield body[:cut]
                yield None
                return
            held = hub._holds.pop(name, None)
            if held is not None:
                yield body[:held]
                hub.held.set()
                hub.released.wait()
                body = body[held:]
            for i in range(0, len(body), 1 << 20):
                yield body[i : i + (1 << 20)]

        # --- replies ---------------------------------------------------------------------
        def _json(self, value: object) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
