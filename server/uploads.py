"""multipart/form-data streamed straight to disk (never held whole in memory)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from litestar import Request
from multipart import (
    MultipartError,
    MultipartSegment,
    ParserLimitReached,
    PushMultipartParser,
    parse_options_header,
)

from server.disk import DiskBudget, disk_full, is_disk_full
from server.errors import BadRequest, PayloadTooLarge, Unprocessable

MAX_FIELD_BYTES = 1 << 20
MAX_PARTS = 512
MAX_PART_HEADER_BYTES = 4096  # one header line of a part: its name and file name fit well inside
MAX_PART_HEADERS = 8  # RFC 7578 needs three


@dataclass
class UploadedFile:
    field: str
    filename: str  # the client's file name, reduced to a safe base name
    path: Path
    size: int


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)

    def files_of(self, name: str) -> list[UploadedFile]:
        return [f for f in self.files if f.field == name]


def safe_filename(name: str) -> str:
    base = re.split(r"[\\/]", name)[-1].strip()
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:128].lstrip(".")
    return base or "upload"


async def receive_multipart(
    request: Request, folder: Path, *, max_bytes: int, min_free_bytes: int = 0
) -> Upload:
    """`min_free_bytes`: 507 before a byte is written (and while streaming) when the upload
    would leave less than this free on the data dir's disk."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != "multipart/form-data" or "boundary" not in options:
        raise Unprocessable("send multipart/form-data")
    disk = DiskBudget(folder, min_free_bytes, "the upload")
    disk.start(request.headers.get("content-length"))
    folder.mkdir(parents=True, exist_ok=True)
    parser = PushMultipartParser(
        options["boundary"],
        max_segment_count=MAX_PARTS,
        max_header_size=MAX_PART_HEADER_BYTES,
        max_header_count=MAX_PART_HEADERS,
    )
    upload = Upload()
    total = 0
    part = _Part()

    def handle(event: MultipartSegment | bytearray | bytes | None) -> None:
        if event is None:  # end of a part
            part.finish(upload)
        elif isinstance(event, bytes | bytearray):
            if part.file is not None:
                disk.before_write(len(event))
            part.add(event)
        elif event.filename is not None:
            path = folder / f"{len(upload.files):04d}-{safe_filename(event.filename)}"
            item = UploadedFile(event.name or "", event.filename, path, 0)
            part.file = (path.open("wb"), item)
        else:
            part.field = (event.name or "", bytearray())

    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(f"the upload is larger than {max_bytes} bytes")
            for event in parser.parse(chunk):
                handle(event)
        for event in parser.parse(b""):
            handle(event)
        if not parser.closed:
            raise BadRequest("the multipart body ended early")
    except ParserLimitReached as exc:
        raise _over_limit(exc) from exc
    except MultipartError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full("the upload") from exc
        raise
    finally:
        part.close()
    return upload


@dataclass
class _Part:
    """The part being received: a file open for writing, or a form field's bytes."""

    file: tuple[IO[bytes], UploadedFile] | None = None
    field: tuple[str, bytearray] | None = None

    def add(self, data: bytes | bytearray) -> None:
        if self.file is not None:
            handle, item = self.file
            handle.write(data)
            item.size += len(data)
        elif self.field is not None:
            buffer = self.field[1]
            if len(buffer) + len(data) > MAX_FIELD_BYTES:
                raise PayloadTooLarge("a form field is larger than 1 MiB")
            buffer.extend(data)

    def finish(self, upload: Upload) -> None:
        if self.file is not None:
            handle, item = self.file
            handle.close()
            upload.files.append(item)
        elif self.field is not None:
            name, buffer = self.field
            upload.fields[name] = bytes(buffer).decode("utf-8", "replace")
        self.file = self.field = None

    def close(self) -> None:
        if self.file is not None:
            self.file[0].close()


def _over_limit(exc: ParserLimitReached) -> BadRequest | PayloadTooLarge:
    """The parser's limit, said as the client can act on it (it names them only in English)."""
    message = str(exc).lower()
    if "segment count" in message:
        return PayloadTooLarge(f"the multipart body has more than {MAX_PARTS} parts")
    if "header length" in message:
        return BadRequest(
            f"a multipart part has a header line over {MAX_PART_HEADER_BYTES} bytes "
            "(a field or file name that long is refused)"
        )
    if "header count" in message:
        return BadRequest(f"a multipart part has more than {MAX_PART_HEADERS} header lines")
    return PayloadTooLarge(f"a multipart limit was reached: {exc}")
