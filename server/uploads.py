"""multipart/form-data streamed straight to disk (never held whole in memory)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from litestar import Request
from multipart import ParserError, PushMultipartParser, parse_options_header

from server.errors import BadRequest, PayloadTooLarge, Unprocessable

MAX_FIELD_BYTES = 1 << 20
MAX_PARTS = 512


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


async def receive_multipart(request: Request, folder: Path, *, max_bytes: int) -> Upload:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != "multipart/form-data" or "boundary" not in options:
        raise Unprocessable("send multipart/form-data")
    folder.mkdir(parents=True, exist_ok=True)
    parser = PushMultipartParser(options["boundary"], max_segment_count=MAX_PARTS)
    upload = Upload()
    total = 0
    state: dict[str, object] = {}

    def handle(event: object) -> None:
        if event is None:  # end of a part
            out = state.pop("file", None)
            if isinstance(out, tuple):
                handle_file, item = out
                handle_file.close()
                upload.files.append(item)
            elif "field" in state:
                name, buffer = state.pop("field")  # type: ignore[misc]
                upload.fields[name] = bytes(buffer).decode("utf-8", "replace")
            return
        if isinstance(event, bytes | bytearray):
            if "file" in state:
                handle_file, item = state["file"]  # type: ignore[misc]
                handle_file.write(event)
                item.size += len(event)
            elif "field" in state:
                buffer = state["field"][1]  # type: ignore[index]
                if len(buffer) + len(event) > MAX_FIELD_BYTES:
                    raise PayloadTooLarge("a form field is larger than 1 MiB")
                buffer.extend(event)
            return
        segment = event
        if segment.filename is not None:
            index = len(upload.files)
            path = folder / f"{index:04d}-{safe_filename(segment.filename)}"
            handle_file: IO[bytes] = path.open("wb")
            state["file"] = (
                handle_file,
                UploadedFile(segment.name or "", segment.filename, path, 0),
            )
        else:
            state["field"] = (segment.name or "", bytearray())

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
    except ParserError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    finally:
        out = state.get("file")
        if isinstance(out, tuple):
            out[0].close()
    return upload
