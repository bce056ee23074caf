"""Data-parallel LoRA over mx.distributed: real ranks on 127.0.0.1 (mlx.launch, ring over TCP).

Tolerance: ranks sum their shards' weighted gradients, so the 2-rank update is the 1-process
update with float32 additions in another order (per-shard sums, then the ring's sum; other matmul
shapes for the shards' padding). AdamW divides by sqrt(v): a gradient element that is ~0 up to
rounding can still move by a sizeable part of one step (lr), so the bound is on the weights, not
the gradients: at most 1e-4 (a tenth of one step at lr 1e-3). Measured: 5.5e-6 max abs (1.4e-6
relative); averaging the shards' losses by examples instead of by their token counts (the
usual mistake) is off by 1.2e-2, a hundred times the bound.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from finetune import distributed
from finetune.config import DataSection, LoRASection, ModelSection, TrainConfig, TrainerSection
from finetune.data import synthetic_dataset
from finetune.families.qwen3_tts.training import prepare_run
from finetune.progress import ProgressWriter

import mlx.core as mx
import numpy as np
import pytest
import yaml

TOLERANCE = 1e-4
LAUNCH_TIMEOUT_S = 300
VENV_BIN = Path(sys.executable).parent


def _prerequisites() -> None:
    if not mx.distributed.is_available():
        pytest.fail("this MLX build has no mx.distributed backend: reinstall mlx (make install)")
    if not (VENV_BIN / "mlx.launch").is_file():
        pytest.fail(f"{VENV_BIN / 'mlx.launch'} is missing: reinstall mlx (make install)")


def _free_ports(count: int = 2) -> int:
    """A base port with `count` consecutive free ports (the ring listens on base + rank)."""
    for _ in range(200):
        base = random.randint(20_000, 60_000)
        sockets = []
        try:
            for offset in range(count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    pytest.fail("no two consecutive free TCP ports on 127.0.0.1")


def _weights(directory: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(directory / "adapters.safetensors")).items()}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys() and a
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


TRAINER = dict(
    batch_size=3,
    grad_accumulation=2,
    learning_rate=1e-3,
    max_steps=4,
    warmup_steps=1,
    schedule="cosine",
    save_every=2,
    keep_checkpoints=5,
    prefetch=0,
    seed=0,
)


@pytest.fixture(scope="module")
def setup(tiny_qwen3_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """5 clips in global batches of 3: the shards are 2 + 1 (uneven) for the full batches and
    1 + 1 for the epoch's tail of 2."""
    _prerequisites()
    root = tmp_path_factory.mktemp("dp")
    train = synthetic_dataset(root / "data", 5, seed=3, with_ref=False, min_s=0.6, max_s=1.4)
    config = {
        "model": {"path": str(tiny_qwen3_base), "strategy": "language"},
        "data": {"train": [str(train)]},
        "lora": {"rank": 4, "alpha": 8.0},
        "trainer": TRAINER,
        "output_dir": str(root / "unused"),
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "model": tiny_qwen3_base, "train": train}


def _in_process(setup: dict, out: Path, resume: Path | None = None) -> Path:
    config = TrainConfig(
        model=ModelSection(path=str(setup["model"]), strategy="language"),
        data=DataSection(train=[str(setup["train"])]),
        lora=LoRASection(rank=4, alpha=8.0),
        trainer=TrainerSection(**TRAINER),
        output_dir=str(out),
    )
    run = prepare_run(config, progress=ProgressWriter(stream=io.StringIO()), resume=resume)
    assert run.trainer.parallel is None
    assert run.trainer.train().status == "finished"
    return out / "checkpoint-final"


def _launch(setup: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m finetune train --ranks 2`: the CLI writes the hostfile, runs mlx.launch."""
    command = [sys.executable, "-m", "finetune", "train", "--config", str(setup["config"])]
    command += ["--ranks", "2", "--port", str(_free_ports()), "--output", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    done = subprocess.run(
        command,
        cwd=setup["root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def two_ranks(setup: dict) -> dict:
    out = setup["root"] / "two"
    done = _launch(setup, out, "--progress-file", str(setup["root"] / "two.jsonl"))
    return {"out": out, "stdout": done.stdout}


def test_two_ranks_give_the_adapter_of_one_process_on_the_same_global_batch(setup, two_ranks):
    single = _weights(_in_process(setup, setup["root"] / "single"))
    parallel = _weights(two_ranks["out"] / "checkpoint-final")
    assert _max_diff(single, parallel) <= TOLERANCE
    start = {k: v for k, v in single.items() if k.endswith("lora_b")}
    assert any(np.abs(v).max() > 100 * TOLERANCE for v in start.values()), "nothing trained"


def test_rank_zero_alone_reports_and_writes(setup, two_ranks):
    events = _events(two_ranks["stdout"])
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("done") == 1
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    # Samples are the global batch's: 2 accumulated batches of 3 (the epoch tail: 3 + 2).
    assert all(e["samples_per_s"] > 0 for e in steps)
    written = sorted(p.name for p in two_ranks["out"].iterdir())
    assert written == ["checkpoint-000002", "checkpoint-000004", "checkpoint-final"]
    progress = _events((setup["root"] / "two.jsonl").read_text())
    saved = [e["path"] for e in progress if e["event"] == "checkpoint"]
    assert len(saved) == 3
    assert len(saved) == len(set(saved))  # each checkpoint announced once: by rank 0


def test_a_two_rank_run_resumes_exactly_with_two_ranks_or_one(setup, two_ranks):
    halfway = two_ranks["out"] / "checkpoint-000002"
    state = json.loads((halfway / "trainer_state.json").read_text())
    assert state["step"] == 2
    resumed_out = setup["root"] / "resumed"
    _launch(setup, resumed_out, "--resume", str(halfway))
    uninterrupted = _weights(two_ranks["out"] / "checkpoint-final")
    # Two ranks again: the same shards, the same sums, so the same bits.
    resumed = _weights(resumed_out / "checkpoint-final")
    assert _max_diff(uninterrupted, resumed) == 0.0
    # One rank from a two-rank checkpoint: the global batch is the same, its split is not.
    alone = _weights(_in_process(setup, setup["root"] / "alone", resume=halfway))
    assert _max_diff(uninterrupted, alone) <= TOLERANCE


TOY = """
import json, sys
from itertools import count
from pathlib import Path

import finetune
from finetune import distributed
from finetune.progress import ProgressWriter
from finetune.trainer import Trainer, TrainerConfig

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

out = Path(sys.argv[1])
group = distributed.launched_group()
rank = 0 if group is None else group.rank()
mx.random.seed(0)
model = nn.Linear(4, 3)
xs, ys = mx.random.normal((7, 4)), mx.random.normal((7, 3))

def collate(idx):
    return xs[mx.array(idx)], ys[mx.array(idx)]

def loss_fn(module, batch):
    x, y = batch
    err = (module(x) - y) ** 2
    positive = y > 0
    a = err.sum(axis=1).mean()
    b = (err * positive).sum() / mx.maximum(positive.sum(), 1)
    return a + 0.5 * b, {"main": a, "sub": b}

terms = distributed.LossTerms(
    {"main": 1.0, "sub": 0.5},
    lambda batch: {"main": batch[0].shape[0], "sub": (batch[1] > 0).sum().item()},
)
order = [[0, 1, 2], [3, 4, 5], [6]]  # the tail batch has fewer examples than ranks

def batches(epoch, index):
    for e in count(epoch):
        for i in range(index if e == epoch else 0, len(order)):
            yield e, i, distributed.shard_batch(collate, order[i], group)

def save(module, path):
    weights = dict(tree_flatten(module.trainable_parameters()))
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)

trainer = Trainer(
    model, loss_fn, batches, len(order), save,
    TrainerConfig(learning_rate=0.05, max_steps=6, schedule="constant", weight_decay=0.0),
    out / f"rank-{rank}", samples_in=lambda b: b[0].shape[0],
    progress=ProgressWriter(stream=sys.stdout), group=group, loss_terms=terms,
)
print(json.dumps({"rank": rank, "size": 1 if group is None else group.size(),
                  "status": trainer.train().status}), flush=True)
"""


def test_the_trainer_shards_uneven_and_empty_shards_and_only_rank_zero_writes(setup):
    """The shared trainer with a toy model and a loss of two differently-counted means: global
    batches of 3, 3 and 1 example(s) over 2 ranks (shards 2+1, 2+1, 1+empty)."""
    script = setup["root"] / "toy.py"
    script.write_text(TOY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    single = setup["root"] / "toy-single"
    subprocess.run([sys.executable, str(script), str(single)], env=env, check=True, timeout=120)
    parallel = setup["root"] / "toy-two"
    hostfile = distributed.write_hostfile(
        setup["root"] / "hostfile.json", distributed.hostfile(["127.0.0.1"], 2)
    )
    command = distributed.launch_command([], hostfile, port=_free_ports())
    command = [*command[: command.index("--") + 2], str(script), str(parallel)]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [e for e in _events(done.stdout) if "rank" in e]
    assert sorted((r["rank"], r["size"], r["status"]) for r in reports) == [
        (0, 2, "finished"),
        (1, 2, "finished"),
    ]
    assert not (parallel / "rank-1").exists(), "rank 1 wrote files"
    a = _weights(single / "rank-0" / "checkpoint-final")
    b = _weights(parallel / "rank-0" / "checkpoint-final")
    assert _max_diff(a, b) <= 1e-5  # SGD-sized steps on a 4x3 layer: rounding only


def test_a_size_one_group_takes_the_single_process_path_bit_for_bit(setup, tmp_path):
    """`mx.distributed.init()` outside a launch is a group of one: the trainer must not treat
    it as data-parallel (no weighting, no all_sum), so its run is the plain one, bit for bit."""
    from finetune.trainer import Trainer

    group = mx.distributed.init()
    assert group.size() == 1 and distributed.launched_group() is None
    plain = _weights(_in_process(setup, tmp_path / "plain"))
    original = Trainer.__init__

    def with_group(self, *args, **kwargs):
        kwargs["group"] = group
        original(self, *args, **kwargs)

    Trainer.__init__ = with_group  # type: ignore[method-assign]
    try:
        grouped = _weights(_in_process(setup, tmp_path / "grouped"))
    finally:
        Trainer.__init__ = original  # type: ignore[method-assign]
    assert _max_diff(plain, grouped) == 0.0


def test_the_launcher_builds_the_documented_mlx_launch_line(tmp_path):
    content = distributed.hostfile(["127.0.0.1", "localhost"], 2)
    assert content["backend"] == "ring"
    assert [h["ips"] for h in content["hosts"]] == [["127.0.0.1"]] * 4
    path = distributed.write_hostfile(tmp_path / "hosts.json", content)
    line = distributed.launch_command(["train", "--config", "c.yaml"], path, port=40000)
    assert Path(line[0]).name == "mlx.launch"
    assert line[line.index("--hostfile") + 1] == str(path)
    assert line[line.index("--starting-port") + 1] == "40000"
    rank_argv = [sys.executable, "-m", "finetune", "train", "--config", "c.yaml"]
    assert line[line.index("--") + 1 :] == rank_argv
    if shutil.which("mpirun") is None:  # MPI is not installed here: a clear refusal
        with pytest.raises(ValueError, match="mpirun"):
            distributed.launch(["train"], ["127.0.0.1", "127.0.0.1"], backend="mpi")
