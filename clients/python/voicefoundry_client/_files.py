"""Writing audio to disk: atomic replace, and real sizes in a streamed WAV's header."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

UNKNOWN_SIZE = 0xFFFFFFFF


def temp_beside(path: Path) -> tuple[BinaryIO, Path]:
    """A new temp file in `path`'s folder (so the final rename stays on one filesystem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    return os.fdopen(fd, "w+b"), Path(name)


def finalize_streamed_wav(handle: BinaryIO) -> None:
    """A streamed WAV says 'unknown length' (0xFFFFFFFF); write the real sizes once complete."""
    handle.flush()
    end = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    head = handle.read(min(end, 4096))
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= len(head):
        chunk = head[offset : offset + 4]
        (size,) = struct.unpack("<I", head[offset + 4 : offset + 8])
        if chunk == b"data":
            handle.seek(4)
            handle.write(struct.pack("<I", min(end - 8, UNKNOWN_SIZE - 1)))
            handle.seek(offset + 4)
            handle.write(struct.pack("<I", min(end - offset - 8, UNKNOWN_SIZE - 1)))
            handle.seek(0, os.SEEK_END)
            return
        offset += 8 + size + (size & 1)
