"""A stand-in for the `sounddevice` module in a client process: a real-time fake audio device.

`InputStream` calls its callback every `blocksize` samples of wall time with the next block of
the microphone signal (`FAKE_SD_MIC`, a .npy of float32 samples; silence after it ends), as a
sound card does; `OutputStream` calls its callback at the same pace and records every block
the client plays (`RECORDED`). Only the parts of the API Kyutai's `moshi.client` uses.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

RECORDED: list[np.ndarray] = []


class _Stream:
    def __init__(
        self, *, samplerate: float, channels: int, blocksize: int, callback: Any, **_: Any
    ) -> None:
        self.rate = float(samplerate)
        self.channels = channels
        self.blocksize = blocksize
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        started = time.monotonic()
        block = 0
        while not self._stop.is_set():
            due = started + block * self.blocksize / self.rate
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            self._block(block)
            block += 1

    def _block(self, index: int) -> None:
        raise NotImplementedError


class InputStream(_Stream):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mic = np.load(os.environ["FAKE_SD_MIC"]).astype(np.float32)

    def _block(self, index: int) -> None:
        data = np.zeros((self.blocksize, self.channels), np.float32)
        piece = self.mic[index * self.blocksize : (index + 1) * self.blocksize]
        data[: len(piece), 0] = piece
        self.callback(data, self.blocksize, None, None)


class OutputStream(_Stream):
    def _block(self, index: int) -> None:
        data = np.zeros((self.blocksize, self.channels), np.float32)
        self.callback(data, self.blocksize, None, None)
        RECORDED.append(data[:, 0].copy())
