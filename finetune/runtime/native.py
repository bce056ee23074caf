"""Build the runtime's small native libraries (finetune/runtime/csrc) with the system compiler:
C libraries loaded with ctypes (`library`) and C++ MLX extensions imported as Python modules
(`mlx_extension`).

Each is compiled once per source text, machine and toolchain into a cache folder
(VOICEFOUNDRY_NATIVE_DIR, else $XDG_CACHE_HOME/voicefoundry/native, else
~/.cache/voicefoundry/native; with no home, under the temp dir) and reused by every later
process; concurrent builders each write a temporary file and rename it into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

NATIVE_DIR_ENV = "VOICEFOUNDRY_NATIVE_DIR"
SOURCES = Path(__file__).with_name("csrc")
COMPILE_TIMEOUT_S = 300.0
CFLAGS = ("-O3", "-shared", "-fPIC")
# MLX's own extension recipe (mlx/extension.py): nanobind linked statically, in MLX's domain.
# -ffp-contract=off: a kernel that reproduces MLX's values rounds each product alone.
CXXFLAGS = (
    "-O2",
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
    "-ffp-contract=off",
    "-DNB_DOMAIN=mlx",
)


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


def cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def library(name: str, link: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> Path:
    """The shared library built from csrc/<name>.c (CFLAGS plus `flags`), compiling it when no
    build of it exists."""
    cc = compiler()
    if cc is None:
        raise NativeBuildError("no C compiler (cc, gcc or clang; or set CC)")
    # Everything that shapes the build names it: a changed flag never reuses an older build.
    recipe = (platform.machine(), *CFLAGS, *flags, *link)
    # The headers the sources share (csrc/*.h) name the build too.
    key = _key((SOURCES / f"{name}.c", *sorted(SOURCES.glob("*.h"))), recipe)
    target = cache_dir() / f"lib{name}-{key}.so"
    command = [cc, *CFLAGS, *flags, "-o", "{out}", str(SOURCES / f"{name}.c"), *link]
    return _build(target, command)


class Unavailable(Exception):
    """Why an optional native piece cannot be had here (its message is the whole reason)."""


class Lazy(Generic[T]):
    """What `make()` returns, made by the first `load()` (once, whatever the threads). Where it
    raises `Unavailable` or one of `expected`, `load()` returns None, `problem` says why and no
    later call tries again: callers then take their slower path."""

    def __init__(self, make: Callable[[], T], expected: tuple[type[Exception], ...] = ()) -> None:
        self._make = make
        self._expected: tuple[type[Exception], ...] = (Unavailable, *expected)
        self._lock = threading.Lock()
        self.value: T | None = None
        self.problem: str | None = None

    def load(self) -> T | None:
        with self._lock:
            if self.value is None and self.problem is None:
                try:
                    self.value = self._make()
                except self._expected as exc:
                    self.problem = self._why(exc)
            return self.value

    def _why(self, exc: Exception) -> str:
        return str(exc) if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {exc}"


class LazyLibrary(Lazy[ctypes.CDLL]):
    """csrc/<name>.c, built and loaded by the first call that needs it (once, whatever the
    threads); `problem` says why not when it cannot be, and callers then take their numpy path."""

    def __init__(
        self,
        name: str,
        declare: Callable[[ctypes.CDLL], None],
        *,
        link: tuple[str, ...] = (),
        flags: tuple[str, ...] = (),
    ) -> None:
        def make() -> ctypes.CDLL:
            lib = ctypes.CDLL(str(library(name, link=link, flags=flags)))
            declare(lib)
            return lib

        super().__init__(make, (NativeBuildError, OSError, AttributeError))
        self.name = name

    @property
    def lib(self) -> ctypes.CDLL | None:
        return self.value

    @lib.setter
    def lib(self, lib: ctypes.CDLL | None) -> None:
        self.value = lib

    def _why(self, exc: Exception) -> str:
        return str(exc)

    def describe(self) -> str:
        """What computes it here, for `voicefoundry doctor`."""
        lib = self.load()
        return f"compiled ({lib._name})" if lib is not None else f"numpy ({self.problem})"


def mlx_extension(name: str) -> Path:
    """The Python extension module built from csrc/<name>.cpp against the installed MLX's headers
    and library and nanobind's sources, in MLX's nanobind domain (so `mlx.core.array` crosses
    over); compiled when no build of it exists. Import it from the returned file's folder."""
    import sysconfig

    import mlx.core as mx
    import nanobind

    cxx = cxx_compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler (c++, g++ or clang++; or set CXX)")
    # mlx is a namespace package (any folder named mlx on sys.path joins it): locate the
    # installed one by its compiled core.
    mlx_root = Path(str(mx.__file__)).parent
    includes = (
        f"-I{mlx_root / 'include'}",
        f"-I{nanobind.include_dir()}",
        f"-I{Path(nanobind.__file__).parent / 'ext' / 'robin_map' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
    )
    link = (f"-L{mlx_root / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_root / 'lib'}")
    sources = (SOURCES / f"{name}.cpp", Path(nanobind.source_dir()) / "nb_combined.cpp")
    recipe = (
        platform.machine(),
        cxx,
        getattr(mx, "__version__", ""),
        nanobind.__version__,
        *CXXFLAGS,
        *includes,
        *link,
    )
    key = _key(sources, recipe)
    # The file keeps the module's own name, so each build has a folder of its own.
    target = (
        cache_dir() / f"{name}-{key}" / f"{name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    )
    return _build(target, [cxx, *CXXFLAGS, *includes, "-o", "{out}", *map(str, sources), *link])


def _key(sources: tuple[Path, ...], recipe: tuple[str, ...]) -> str:
    text = b"".join(source.read_bytes() for source in sources)
    return hashlib.sha256(text + " ".join(recipe).encode()).hexdigest()[:16]


def _build(target: Path, command: list[str]) -> Path:
    """Run `command` ("{out}" standing for the output file) unless `target` exists; the output is
    written beside it and renamed into place, so concurrent builders never see half a file."""
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=target.name, suffix=".part", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise NativeBuildError(f"cannot write {target.parent}: {exc}") from exc
    command = [partial if part == "{out}" else part for part in command]
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
