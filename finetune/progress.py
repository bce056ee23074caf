"""Training progress as JSON lines (stdout or a file): the server's job runner reads them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any


class ProgressWriter:
    def __init__(self, path: Path | None = None, stream: IO[str] | None = None) -> None:
        self._file = path.open("a", buffering=1) if path is not None else None
        self._stream = stream if stream is not None else (None if path else sys.stdout)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, default=_plain)
        for out in (self._file, self._stream):
            if out is not None:
                out.write(line + "\n")
                out.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
