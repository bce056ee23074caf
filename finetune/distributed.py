"""Data-parallel training over `mx.distributed` (ring over TCP, or MPI), and its launcher.

A launch (`mlx.launch`, or `python -m finetune train --hosts/--ranks`, which builds that line)
starts one process per rank. Every rank builds the same model and adapter (same seed), reads the
same global batches from the same `BatchPlan`, keeps only its slice of each (`local_slice`), and
sums its weighted gradients with the others (`DataParallel.value_and_grad` + `all_sum`), so the
update is the single-process update on the global batch up to the order of float additions.

Why weights and not a plain mean: a family's loss is a mean over *tokens* (or frames) of the
batch, not over examples, so the mean of the ranks' shard losses is not the global batch's
loss. A family that declares its loss as `LossTerms` (coefficient x mean over counted units, per
part) gets each shard's part weighted by its share of the global count: exact. Without terms,
shards are weighted by their share of the examples (exact for per-example means only).

Only rank 0 writes checkpoints, progress and the final adapter; a checkpoint stores the global
data position, so a run resumes with any number of ranks (the shards of a global batch change,
the global batch does not).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from finetune.arrays import flat_items, scalar
from finetune.progress import Event, ProgressWriter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

T = TypeVar("T")
BACKENDS = ("ring", "mpi")
DEFAULT_PORT = 32323  # mlx.launch's own default for the ring backend
# The environment a launcher leaves for each rank: mlx.launch's ring backend, then MPI's.
RING_ENV = "MLX_HOSTFILE"
MPI_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")

Group = mx.distributed.Group
Counts = Callable[[Any], Mapping[str, float]]


def _launched_backend() -> str | None:
    hostfile = os.environ.get(RING_ENV)
    if hostfile and Path(hostfile).is_file() and Path(hostfile).read_text().strip():
        return "ring"  # mlx.launch leaves an empty hostfile for a one-rank launch
    if any(int(os.environ.get(name, "1") or "1") > 1 for name in MPI_SIZE_ENV):
        return "mpi"
    return None


@functools.cache
def launched_group() -> Group | None:
    """This process's group when a launcher started several ranks; None for a plain process
    (and a one-rank launch): the single-process path, unchanged."""
    backend = _launched_backend()
    if backend is None:
        return None
    group = mx.distributed.init(strict=True, backend=backend)
    return group if group.size() > 1 else None


def is_writer(group: Group | None = None) -> bool:
    """Whether this process writes files and progress: rank 0, or the only process."""
    group = launched_group() if group is None else group
    return group is None or group.rank() == 0


def local_slice(items: Sequence[T], group: Group | None) -> list[T]:
    """This rank's contiguous slice of a global batch; sizes differ by at most one (the first
    ranks get the extra), and a rank gets nothing when the batch has fewer items than ranks."""
    if group is None:
        return list(items)
    size, rank = group.size(), group.rank()
    base, extra = divmod(len(items), size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (rank < extra)])


@dataclass(frozen=True)
class Shard:
    """One rank's collated slice of a global batch. A rank whose slice is empty (a global batch
    with fewer examples than ranks) collates the batch's last example and weighs it 0: it
    still computes a loss with the same parts and joins every `all_sum` of the step."""

    batch: Any
    empty: bool = False


def shard_batch(collate: Callable[[list[T]], Any], items: Sequence[T], group: Group | None) -> Any:
    """`collate(items)` in one process; this rank's `Shard` of them in a data-parallel run."""
    if group is None:
        return collate(list(items))
    mine = local_slice(items, group)
    return Shard(collate(mine), False) if mine else Shard(collate([items[-1]]), True)


@dataclass(frozen=True)
class LossTerms:
    """How a family's loss is built: `total == sum(coefficients[k] * parts[k])`, each part a
    mean over `counts(batch)[k]` units (tokens, frames) of the batch."""

    coefficients: Mapping[str, float]
    counts: Counts


def _flat_sum(group: Group, tree: Any) -> Any:
    """`all_sum` of every array of `tree` in one message (one round trip, not one per tensor)."""
    leaves = flat_items(tree)
    if not leaves:
        return tree
    flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in leaves])
    summed = mx.distributed.all_sum(flat, group=group)
    out, offset = [], 0
    for key, value in leaves:
        part = summed[offset : offset + value.size].reshape(value.shape)
        out.append((key, part.astype(value.dtype)))
        offset += value.size
    return tree_unflatten(out)


class DataParallel:
    """One rank's part of a data-parallel optimizer step (see the module docstring)."""

    def __init__(
        self, group: Group, terms: LossTerms | None, samples_in: Callable[[Any], int]
    ) -> None:
        self.group = group
        self.terms = terms
        self.samples_in = samples_in

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def unwrap(self, shard: Any) -> Shard:
        if not isinstance(shard, Shard):
            raise TypeError(
                "a data-parallel run needs the family's batches sharded "
                "(finetune.distributed.shard_batch); this family does not shard them"
            )
        return shard

    def samples(self, shard: Shard) -> int:
        return 0 if shard.empty else self.samples_in(shard.batch)

    def shares(self, shard: Shard) -> dict[str, float]:
        """This shard's share of each part's global count (one small `all_sum`)."""
        if self.terms is None:
            local = {"examples": float(self.samples(shard))}
        else:
            counts = {} if shard.empty else self.terms.counts(shard.batch)
            local = {k: float(counts.get(k, 0.0)) for k in self.terms.coefficients}
        keys = sorted(local)
        totals = mx.distributed.all_sum(mx.array([local[k] for k in keys]), group=self.group)
        return {
            k: local[k] / float(total) if total > 0 else 0.0
            for k, total in zip(keys, np.asarray(totals), strict=True)
        }

    def weigh(
        self, loss: mx.array, parts: dict[str, mx.array], share: Mapping[str, float]
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """The shard's loss and parts scaled so that their sums over the ranks are the global
        batch's values (its gradients too, being linear in the loss)."""
        if self.terms is None:
            w = share["examples"]
            return loss * w, {k: v * w for k, v in parts.items()}
        coefficients = self.terms.coefficients
        weighted = {k: v * share.get(k, 0.0) for k, v in parts.items()}
        total = mx.array(0.0)
        for key, coefficient in coefficients.items():
            total = total + coefficient * parts[key] * share[key]
        return total, weighted

    def all_sum(self, tree: Any) -> Any:
        return _flat_sum(self.group, tree)

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank's `flag` is True (a stop request reaches them all)."""
        total = mx.distributed.all_sum(mx.array([1.0 if flag else 0.0]), group=self.group)
        return scalar(total.sum()) > 0

    def check_replicas(self, module: nn.Module, step: int) -> None:
        """Refuse to train when the ranks do not start from the same weights and step (another
        seed, base model or checkpoint on one host): their updates would silently disagree."""
        total = mx.array(0.0)
        for _, value in flat_items(module.trainable_parameters()):
            total = total + mx.sum(value.astype(mx.float32) ** 2)
        mine = mx.array([[float(step), scalar(total)]])
        every = np.asarray(mx.distributed.all_gather(mine, group=self.group)).tolist()
        if any(row != every[0] for row in every):
            described = ", ".join(
                f"rank {r}: step {s:g}, sum of squares {w:.9g}" for r, (s, w) in enumerate(every)
            )
            raise RuntimeError(f"the ranks start from different weights or steps ({described})")


# --------------------------------------------------------------------------- launching


def _ip(host: str) -> str:
    """mlx.launch's ring backend connects to IPs, not names: resolve a name here."""
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise ValueError(f"cannot resolve host {host!r} ({exc})") from exc


def hostfile(hosts: Sequence[str], ranks_per_host: int = 1, backend: str = "ring") -> dict:
    """mlx.launch's JSON hostfile: one entry per rank (`ssh` name, the `ips` the ring uses)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
    if ranks_per_host < 1:
        raise ValueError("ranks per host must be >= 1")
    entries = [{"ssh": host, "ips": [_ip(host)]} for host in hosts for _ in range(ranks_per_host)]
    return {"backend": backend, "hosts": entries}


def launch_command(
    argv: Sequence[str],
    hostfile_path: Path,
    *,
    port: int = DEFAULT_PORT,
    python: str | None = None,
    cwd: str | None = None,
) -> list[str]:
    """`mlx.launch --hostfile F ... -- python -m finetune <argv>`: every rank runs `argv`."""
    python = python or sys.executable
    launcher = Path(python).with_name("mlx.launch")
    return [
        str(launcher) if launcher.is_file() else "mlx.launch",
        "--hostfile",
        str(hostfile_path),
        "--starting-port",
        str(port),
        "--cwd",
        cwd or os.getcwd(),
        "--",
        python,
        "-m",
        "finetune",
        *argv,
    ]


def write_hostfile(path: Path, content: dict) -> Path:
    from finetune.fsutil import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(content, indent=2) + "\n").encode())
    return path


class Silent(ProgressWriter):
    """The progress writer of ranks other than 0: rank 0 reports for all of them."""

    def __init__(self) -> None:
        super().__init__(stream=io.StringIO())

    def emit(self, event: Event) -> None:
        del event


def launch(
    argv: Sequence[str],
    hosts: Sequence[str],
    *,
    ranks_per_host: int = 1,
    port: int = DEFAULT_PORT,
    backend: str = "ring",
) -> int:
    """Run `python -m finetune <argv>` on every rank through mlx.launch; its exit status.

    Remote hosts are reached over ssh by mlx.launch itself, which runs this same interpreter path
    in this same working directory there (the checkout and its venv at the same place)."""
    import shutil
    import subprocess
    import tempfile

    if backend == "mpi" and shutil.which("mpirun") is None:
        raise ValueError("--backend mpi needs mpirun (apt-get install openmpi-bin), or use ring")
    content = hostfile(hosts, ranks_per_host, backend)
    with tempfile.TemporaryDirectory(prefix="vf-launch-") as folder:
        path = write_hostfile(Path(folder) / "hostfile.json", content)
        # Its own process group (mlx.launch and the local ranks): a stop of this launcher
        # (SIGTERM, Ctrl-C) reaches every rank, which checkpoints as a single process would.
        proc = subprocess.Popen(launch_command(argv, path, port=port), start_new_session=True)

        def forward(signum: int, frame: object) -> None:
            del frame
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if proc.poll() is None:
                forward(signal.SIGTERM, None)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    forward(signal.SIGKILL, None)
