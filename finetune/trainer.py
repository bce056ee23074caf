"""A small MLX training loop with exact resume.

AdamW, gradient accumulation, global-norm clipping, cosine / linear / constant schedules with
warmup, validation (in eval mode: dropout off), best / final / periodic checkpoints with
rotation, an optional quality hook at step 0 and at every saved checkpoint, one `mx.eval` per
optimizer step, JSON-lines progress and a clean stop on SIGTERM.

A checkpoint holds the trainable tensors, the optimizer state (its step drives the schedule), the
trainer step and the data position. Randomness (dropout) is reseeded from (seed, step) at every
step, so a run resumed at step k draws exactly what the uninterrupted run drew.

With a distributed group of several ranks (`finetune.distributed`) each rank computes its shard
of every global batch, the weighted gradients are summed across ranks before clipping, and only
rank 0 writes checkpoints and progress; one process takes the same path as before, untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune import distributed
from finetune.arrays import flat_items, load_arrays, scalar
from finetune.fsutil import atomic_directory, ensure_free_space
from finetune.progress import Checkpoint, Done, Eval, ProgressWriter, Resume, Start, Step, Stopped

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_unflatten

SCHEDULES = ("cosine", "linear", "constant")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"

LossFn = Callable[[nn.Module, Any], tuple[mx.array, dict[str, mx.array]]]
SaveWeights = Callable[[nn.Module, Path], None]
# Yields (epoch, batch_index, batch) forever from the given position.
BatchSource = Callable[[int, int], Iterator[tuple[int, int, Any]]]
# Quality report of the current weights: (step, checkpoint dir they are saved to, None at step 0)
# -> a dict with "similarity" (float, or None when not available), or None for no report.
CheckpointHook = Callable[[int, Path | None], dict[str, Any] | None]
SIMILARITY_TOLERANCE = 0.05


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (dropout off); every submodule's own mode is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for sub, training in modes:
            sub._set_training_mode(training)


@dataclass
class Score:
    step: int
    val: float | None = None
    similarity: float | None = None


@dataclass
class BestChoice:
    """Which scored checkpoint is `checkpoint-best`.

    The rule: the lowest validation loss among checkpoints whose speaker similarity is within
    `tolerance` (0.05) of the best similarity seen so far; without a validation set, the highest
    similarity; without any similarity (no quality hook, or a family that cannot measure it),
    the lowest validation loss. Once a similarity has been reported, a score without one (an
    eval step that is not a checkpoint step, or an empty preview) is not a candidate. Step 0
    (the untrained baseline) is never a candidate. It is decided online, as scores come: a
    score replaces the current best when that one fell out of the similarity tolerance, or
    when it is a candidate and better (lower loss; with no loss, higher similarity).
    """

    tolerance: float = SIMILARITY_TOLERANCE
    best: Score | None = None
    top_similarity: float | None = None

    def eligible(self, score: Score) -> bool:
        if self.top_similarity is None:
            return True
        return score.similarity is not None and (
            score.similarity >= self.top_similarity - self.tolerance
        )

    def offer(self, score: Score) -> bool:
        """Record `score`; True when it becomes the best."""
        if score.similarity is not None and (
            self.top_similarity is None or score.similarity > self.top_similarity
        ):
            self.top_similarity = score.similarity
        if not self.eligible(score):
            return False
        if self.best is None or not self.eligible(self.best) or self._better(score, self.best):
            self.best = score
            return True
        return False

    @staticmethod
    def _better(a: Score, b: Score) -> bool:
        if a.val is not None and b.val is not None:
            return a.val < b.val
        if a.similarity is not None and b.similarity is not None:
            return a.similarity > b.similarity
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": None if self.best is None else asdict(self.best),
            "top_similarity": self.top_similarity,
        }

    def load(self, data: dict[str, Any] | None, best_val: float | None) -> None:
        if data is None:  # a checkpoint from before the similarity rule: only the loss
            self.best = None if best_val is None else Score(step=-1, val=best_val)
            return
        self.best = None if data.get("best") is None else Score(**data["best"])
        self.top_similarity = data.get("top_similarity")


@dataclass
class TrainerConfig:
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    num_epochs: int = 1
    max_steps: int | None = None
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 3
    min_free_bytes: int = 0  # a checkpoint is refused (DiskSpaceError) below this
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            problems.append("learning_rate must be a positive number")
        if self.grad_accumulation < 1:
            problems.append("grad_accumulation must be >= 1")
        if self.num_epochs < 1:
            problems.append("num_epochs must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be >= 1")
        if self.warmup_steps < 0:
            problems.append("warmup_steps must be >= 0")
        if self.min_free_bytes < 0:
            problems.append("min_free_bytes must be >= 0")
        if problems:
            raise ValueError("invalid trainer config: " + "; ".join(problems))


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped"
    step: int
    total_steps: int
    final_dir: Path | None
    best_dir: Path | None
    last_loss: float | None


class Trainer:
    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        batches: BatchSource,
        batches_per_epoch: int,
        save_weights: SaveWeights,
        config: TrainerConfig,
        output_dir: Path,
        *,
        samples_in: Callable[[Any], int] = len,
        val_batches: list[Any] | None = None,
        progress: ProgressWriter | None = None,
        on_checkpoint: CheckpointHook | None = None,
        group: distributed.Group | None = None,
        loss_terms: distributed.LossTerms | None = None,
    ) -> None:
        if batches_per_epoch < 1:
            raise ValueError("no training batches")
        if group is None and distributed.launched_group() is not None:
            raise ValueError("this family trains in one process only (its batches are not sharded)")
        self.parallel = (
            distributed.DataParallel(group, loss_terms, samples_in)
            if group is not None and group.size() > 1
            else None
        )
        self.writer = self.parallel is None or self.parallel.rank == 0
        self.module = module
        self.loss_fn = loss_fn
        self.batches = batches
        self.save_weights = save_weights
        self.config = config
        self.output_dir = Path(output_dir)
        self.samples_in = samples_in
        self.val_batches = val_batches or []
        self.progress = (progress or ProgressWriter()) if self.writer else distributed.Silent()
        self.on_checkpoint = on_checkpoint
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accumulation)
        self.total_steps = config.max_steps or steps_per_epoch * config.num_epochs
        self.optimizer = optim.AdamW(
            learning_rate=self._schedule(),
            betas=[config.beta1, config.beta2],
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        self.optimizer.init(module.trainable_parameters())
        self.step = 0
        self.position = (0, 0)
        self.best_val: float | None = None
        self.choice = BestChoice()
        # (step, value) of the last validation loss / quality report: a step is measured once.
        self._last_val: tuple[int, float | None] | None = None
        self._last_report: tuple[int, dict[str, Any] | None] | None = None
        self._stop_requested = False
        self._value_and_grad = nn.value_and_grad(module, self._loss)
        self._shard_value_and_grad = nn.value_and_grad(module, self._shard_loss)

    # --- schedule -----------------------------------------------------------------------
    def _schedule(self) -> Callable[[mx.array], mx.array]:
        cfg = self.config
        decay_steps = max(self.total_steps - cfg.warmup_steps, 1)
        end = cfg.learning_rate * cfg.min_lr_ratio
        if cfg.schedule == "cosine":
            main = optim.cosine_decay(cfg.learning_rate, decay_steps, end)
        elif cfg.schedule == "linear":
            main = optim.linear_schedule(cfg.learning_rate, end, decay_steps)
        else:
            main = lambda _: mx.array(cfg.learning_rate)  # noqa: E731
        if cfg.warmup_steps == 0:
            return main
        warmup = optim.linear_schedule(
            cfg.learning_rate / cfg.warmup_steps, cfg.learning_rate, cfg.warmup_steps
        )
        return optim.join_schedules([warmup, main], [cfg.warmup_steps])

    # --- one step -----------------------------------------------------------------------
    def _loss(self, module: nn.Module, batch: Any) -> tuple[mx.array, dict[str, mx.array]]:
        return self.loss_fn(module, batch)

    def _shard_loss(
        self, module: nn.Module, batch: Any, share: dict[str, float]
    ) -> tuple[mx.array, dict[str, mx.array]]:
        assert self.parallel is not None
        loss, parts = self.loss_fn(module, batch)
        return self.parallel.weigh(loss, parts, share)

    def _optimizer_step(self, source: Iterator[tuple[int, int, Any]]) -> tuple[dict, int]:
        cfg = self.config
        seed = cfg.seed * 1_000_003 + self.step
        # Ranks draw different dropout masks for their different examples.
        mx.random.seed(seed if self.parallel is None else seed * 1009 + self.parallel.rank)
        grads_sum = None
        parts_sum: dict[str, mx.array] = {}
        samples = 0
        for _ in range(cfg.grad_accumulation):
            epoch, index, batch = next(source)
            if self.parallel is None:
                (loss, parts), grads = self._value_and_grad(self.module, batch)
                samples += self.samples_in(batch)
            else:
                shard = self.parallel.unwrap(batch)
                share = self.parallel.shares(shard)
                (loss, parts), grads = self._shard_value_and_grad(self.module, shard.batch, share)
                samples += self.parallel.samples(shard)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            for key, value in {"loss": loss, **parts}.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
            self.position = (epoch, index + 1)
        if self.parallel is not None:  # the shards' weighted sums: the global batch's values
            grads_sum, parts_sum, total = self.parallel.all_sum(
                (grads_sum, parts_sum, mx.array(float(samples)))
            )
            samples = int(total.item())
        scale = 1.0 / cfg.grad_accumulation
        grads = tree_map(lambda g: g * scale, grads_sum)
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        self.optimizer.update(self.module, grads)
        means = {k: v * scale for k, v in parts_sum.items()}
        mx.eval(self.module.trainable_parameters(), self.optimizer.state, means, grad_norm)
        report = {k: scalar(v) for k, v in means.items()}
        report["grad_norm"] = scalar(grad_norm)
        return report, samples

    def evaluate(self) -> float | None:
        """Mean validation loss, in eval mode (dropout off); the module's modes are restored."""
        if not self.val_batches:
            return None
        total = 0.0
        with eval_mode(self.module):
            for batch in self.val_batches:
                loss, _ = self.loss_fn(self.module, batch)
                total += scalar(loss)
        return total / len(self.val_batches)

    def report_quality(self, path: Path | None) -> dict[str, Any] | None:
        """The quality hook's report on the current weights (None without a hook)."""
        if self.on_checkpoint is None or not self.writer:
            return None
        return self.on_checkpoint(self.step, path)

    # --- loop ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: no signal handling there
            previous = None
        self.progress.emit(
            Start(
                step=self.step,
                total_steps=self.total_steps,
                trainable_parameters=sum(
                    v.size for _, v in flat_items(self.module.trainable_parameters())
                ),
            )
        )
        if self.parallel is not None:
            self.parallel.check_replicas(self.module, self.step)
        if self.step == 0:
            self.report_quality(None)  # the baseline: the untrained voice
        source = self.batches(*self.position)
        started = time.perf_counter()
        start_step = self.step
        last_loss = None
        best_dir = None
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                report, samples = self._optimizer_step(source)
                self.step += 1
                last_loss = report["loss"]
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss became {last_loss} at step {self.step}")
                elapsed = time.perf_counter() - started
                rate = (self.step - start_step) / max(elapsed, 1e-9)
                self.progress.emit(
                    Step(
                        step=self.step,
                        total_steps=self.total_steps,
                        epoch=self.position[0],
                        lr=float(self.optimizer.learning_rate.item()),
                        samples_per_s=round(samples / max(time.perf_counter() - t0, 1e-9), 3),
                        eta_s=round((self.total_steps - self.step) / max(rate, 1e-9), 1),
                        **{k: round(v, 6) for k, v in report.items()},
                    )
                )
                evaluate = bool(cfg.eval_every) and self.step % cfg.eval_every == 0
                periodic = None
                if cfg.save_every and self.step % cfg.save_every == 0:
                    periodic = self.output_dir / f"checkpoint-{self.step:06d}"
                if evaluate or (periodic is not None and self.on_checkpoint is not None):
                    best_dir = self._score(periodic) or best_dir
                if periodic is not None:
                    self.save_checkpoint(periodic)
                    self._rotate()
                if self._stop_agreed():
                    path = self.save_checkpoint(self.output_dir / "checkpoint-last")
                    self.progress.emit(Stopped(step=self.step, checkpoint=str(path)))
                    return TrainResult(
                        "stopped", self.step, self.total_steps, None, best_dir, last_loss
                    )
            final_path = self.output_dir / "checkpoint-final"
            if self.val_batches or self.on_checkpoint is not None:
                best_dir = self._score(final_path) or best_dir
            final = self.save_checkpoint(final_path)
            self.progress.emit(
                Done(step=self.step, checkpoint=str(final), loss=last_loss, best_val=self.best_val)
            )
            return TrainResult("finished", self.step, self.total_steps, final, best_dir, last_loss)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self._stop_requested = True

    def request_stop(self) -> None:
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """A stop requested on any rank stops every rank at the same step."""
        if self.parallel is None:
            return self._stop_requested
        return self.parallel.any(self._stop_requested)

    def _score(self, checkpoint: Path | None) -> Path | None:
        """Validation loss (and, when `checkpoint` is about to be written, the quality report)
        of the current weights; saves `checkpoint-best` when they become the best
        (`BestChoice`). The report runs before the checkpoint is written: same weights, and the
        checkpoint's state then knows whether it is the best."""
        if self._last_val is None or self._last_val[0] != self.step:
            self._last_val = (self.step, self.evaluate())
        val = self._last_val[1]
        report = None
        if checkpoint is not None:
            if self._last_report is None or self._last_report[0] != self.step:
                self._last_report = (self.step, self.report_quality(checkpoint))
            report = self._last_report[1]
        similarity = None if report is None else report.get("similarity")
        if val is None and similarity is None:
            return None  # nothing to choose by (e.g. a family without a speaker encoder)
        improved = self.choice.offer(Score(step=self.step, val=val, similarity=similarity))
        if val is not None:
            self.progress.emit(Eval(step=self.step, val_loss=round(val, 6), improved=improved))
        if improved:
            self.best_val = val
            return self.save_checkpoint(self.output_dir / "checkpoint-best")
        return None

    def _rotate(self) -> None:
        if not self.writer:
            return
        keep = self.config.keep_checkpoints
        periodic = sorted(self.output_dir.glob("checkpoint-[0-9]*"))
        for old in periodic[: max(len(periodic) - keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    # --- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> Path:
        """Adapters + optimizer + trainer state, written beside `path` and renamed into place
        (by rank 0 alone in a data-parallel run: the other ranks hold the same state)."""
        if not self.writer:
            return path
        ensure_free_space(path.parent, self.config.min_free_bytes, f"checkpoint {path.name}")
        with atomic_directory(path) as staging:
            self._write_checkpoint(staging)
        self.progress.emit(Checkpoint(step=self.step, path=str(path)))
        return path

    def _write_checkpoint(self, staging: Path) -> None:
        self.save_weights(self.module, staging)
        optimizer_state = dict(flat_items(self.optimizer.state))
        mx.save_safetensors(str(staging / OPTIMIZER_FILE), optimizer_state)
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.position[0],
            "batch_index": self.position[1],
            "best_val": self.best_val,
            "best_choice": self.choice.to_dict(),
            "seed": self.config.seed,
            "config": asdict(self.config),
        }
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def resume(self, checkpoint: Path) -> None:
        """Restore the weights, optimizer and position saved by `save_checkpoint`."""
        checkpoint = Path(checkpoint)
        state_file = checkpoint / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{checkpoint} is not a trainer checkpoint ({STATE_FILE} missing)"
            )
        state = json.loads(state_file.read_text())
        weights = load_arrays(checkpoint / "adapters.safetensors")
        trainable = dict(flat_items(self.module.trainable_parameters()))
        missing = sorted(set(trainable) - set(weights))
        if missing:
            raise ValueError(f"checkpoint lacks trainable tensors: {', '.join(missing[:5])}")
        self.module.load_weights([(k, weights[k]) for k in trainable], strict=False)
        saved = load_arrays(checkpoint / OPTIMIZER_FILE)
        self.optimizer.state = tree_unflatten(list(saved.items()))
        self.step = int(state["step"])
        self.position = (int(state["epoch"]), int(state["batch_index"]))
        self.best_val = state.get("best_val")
        self.choice.load(state.get("best_choice"), self.best_val)
        mx.eval(self.module.trainable_parameters(), self.optimizer.state)
        self.progress.emit(Resume(step=self.step, checkpoint=str(checkpoint)))
