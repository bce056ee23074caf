"""Run Kyutai's `moshi.client` (PyPI moshi 0.2.13, unchanged) with a fake real-time sound card.

`python -m tests.moshi_client_run [client args]`; env: FAKE_SD_MIC (microphone .npy),
FAKE_SD_OUT (where the speaker's recording goes, .npy), FAKE_SD_SECONDS (how long the
conversation lasts before the user presses Ctrl-C, as the client expects to be stopped).
The installed `moshi/__init__.py` imports the torch model code; the client never uses it, so
the package is set up as a bare namespace over the installed files and only `moshi.client`
(with its `client_utils`) is executed, from the installed source.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import signal
import sys
import threading
import types

import numpy as np

from tests import fake_sounddevice


def main() -> None:
    spec = importlib.util.find_spec("moshi")
    assert spec is not None and spec.submodule_search_locations, "moshi is not installed"
    package = types.ModuleType("moshi")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["moshi"] = package
    sys.modules["sounddevice"] = fake_sounddevice
    from moshi import client

    seconds = float(os.environ["FAKE_SD_SECONDS"])
    # The user presses Ctrl-C, and once more if the client has not gone after a while (as
    # people do): its first interrupt cancels the conversation, a second one ends asyncio.run.
    presses = [threading.Timer(at, _press_ctrl_c) for at in (seconds, seconds + 4)]
    for press in presses:
        press.daemon = True
        press.start()
    # The client's own teardown after Ctrl-C has been seen to hang (in full-suite runs only):
    # past this, the harness shows every thread's stack and ends it, keeping what was played.
    watchdog = threading.Timer(seconds + 12, _end_hung_client)
    watchdog.daemon = True
    watchdog.start()
    sys.argv = ["moshi-client", *sys.argv[1:]]
    client.main()
    for timer in (*presses, watchdog):
        timer.cancel()  # the server ended the conversation first, or the client has gone
    _save_recording()


HUNG_MARK = "[harness] the client is still running after Ctrl-C; its threads:"


def _save_recording() -> None:
    recorded = fake_sounddevice.RECORDED
    np.save(os.environ["FAKE_SD_OUT"], np.concatenate(recorded) if recorded else np.zeros(0))


def _end_hung_client() -> None:
    sys.stderr.write(HUNG_MARK + "\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    _save_recording()
    sys.stdout.flush()
    os._exit(0)


CTRL_C_MARK = "[harness] the user presses Ctrl-C"


def _press_ctrl_c() -> None:
    """Mark the moment in the client's own stderr, so the test can tell a connection lost
    during the conversation from the client's shutdown (its microphone callbacks may still
    send on the closing socket and it then prints "Lost connection" itself)."""
    sys.stderr.write(CTRL_C_MARK + "\n")
    sys.stderr.flush()
    # A real SIGINT, as the terminal sends: unlike _thread.interrupt_main it also wakes a main
    # thread blocked in a system call (the event loop's wait).
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    main()
