"""Build the runtime's small C libraries (finetune/runtime/csrc/*.c) with the system compiler.

Each is compiled once per source text and machine into a cache folder (VOICEFOUNDRY_NATIVE_DIR,
else $XDG_CACHE_HOME/voicefoundry/native, else ~/.cache/voicefoundry/native; with no home, under
the temp dir) and reused by every later process; concurrent builders each write a temporary file
and rename it into place.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

NATIVE_DIR_ENV = "VOICEFOUNDRY_NATIVE_DIR"
SOURCES = Path(__file__).with_name("csrc")
COMPILE_TIMEOUT_S = 60.0
CFLAGS = ("-O3", "-shared", "-fPIC")


class NativeBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    explicit = os.environ.get(NATIVE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry (a bare container user)
            base = os.path.join(tempfile.gettempdir(), f"voicefoundry-{os.getuid()}")
    return Path(base) / "voicefoundry" / "native"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def library(name: str, link: tuple[str, ...] = ()) -> Path:
    """The shared library built from csrc/<name>.c, compiling it when no build of it exists."""
    source = SOURCES / f"{name}.c"
    text = source.read_bytes()
    # Everything that shapes the build names it: a changed flag never reuses an older build.
    recipe = " ".join((platform.machine(), *CFLAGS, *link)).encode()
    key = hashlib.sha256(text + recipe).hexdigest()
    target = cache_dir() / f"lib{name}-{key[:16]}.so"
    if target.exists():
        return target
    cc = compiler()
    if cc is None:
        raise NativeBuildError("no C compiler (cc, gcc or clang; or set CC)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=target.name, suffix=".part", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise NativeBuildError(f"cannot write {target.parent}: {exc}") from exc
    command = [cc, *CFLAGS, "-o", partial, str(source), *link]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise NativeBuildError(f"{' '.join(command)} failed: {done.stderr.strip()[-400:]}")
        os.replace(partial, target)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"{' '.join(command)}: {exc}") from exc
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
