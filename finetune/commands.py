"""The fine-tuning commands: preprocess, train, fuse, bake."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from finetune.smoke import SMOKE_STEPS


class CommandError(Exception):
    """A user error: printed as one clear line, exit status 2."""


def register(subparsers: argparse._SubParsersAction) -> None:
    pre = subparsers.add_parser("preprocess", help="encode clips to cached .codec.npy codes")
    pre.add_argument("--model", required=True, help="model directory (or cached hub id)")
    pre.add_argument("--input", nargs="+", required=True, type=Path, help="JSONL files")
    pre.add_argument("--strategy", default="language", choices=("language", "speaker"))
    pre.add_argument("--max-duration", type=float, default=30.0)
    pre.set_defaults(handler=_guard(_preprocess))

    train = subparsers.add_parser("train", help="LoRA / QLoRA fine-tuning from a YAML config")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"tiny model + synthetic clips, {SMOKE_STEPS} steps, no dataset",
    )
    train.add_argument("--resume", type=Path, help="a checkpoint directory to continue from")
    train.add_argument("--lora-rank", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--model", help="override model.path")
    train.add_argument("--output", help="override output_dir")
    train.add_argument("--progress-file", type=Path, help="also append JSON-lines progress here")
    parallel = train.add_argument_group("data-parallel (mlx.launch; rank 0 writes the files)")
    parallel.add_argument("--hosts", help="comma-separated hosts, one rank each (ssh + IP)")
    parallel.add_argument(
        "--ranks", type=int, help="ranks per host (without --hosts: local ranks on 127.0.0.1)"
    )
    parallel.add_argument("--port", type=int, help="first TCP port of the ring (one per rank)")
    parallel.add_argument("--backend", choices=("ring", "mpi"), default="ring")
    train.set_defaults(handler=_guard(_train))

    fuse = subparsers.add_parser("fuse", help="merge an adapter into a standalone checkpoint")
    fuse.add_argument("--model", required=True)
    fuse.add_argument("--adapter", required=True, type=Path)
    fuse.add_argument("--output", required=True, type=Path)
    fuse.set_defaults(handler=_guard(_fuse))

    bake = subparsers.add_parser("bake", help="bake the mean speaker embedding into a free row")
    bake.add_argument("--config", required=True, type=Path)
    bake.add_argument("--checkpoint", required=True, type=Path)
    bake.add_argument("--output", required=True, type=Path, help="voice package directory")
    bake.add_argument("--name")
    bake.add_argument("--slot", type=int)
    bake.add_argument("--force", action="store_true", help="overwrite an occupied row")
    bake.add_argument(
        "--language",
        help="the language the voice speaks, when its training lines mix languages",
    )
    bake.add_argument(
        "--export", type=Path, help="also write a standalone checkpoint (the adapter fused in)"
    )
    fusing = bake.add_mutually_exclusive_group()
    fusing.add_argument(
        "--no-fuse",
        action="store_true",
        help="export without fusing the adapter (only with --keep-cloning)",
    )
    # Fusing is the default; the old flag is still accepted.
    fusing.add_argument("--fuse-lora", action="store_true", help=argparse.SUPPRESS)
    bake.add_argument(
        "--keep-cloning",
        action="store_true",
        help="export a Base model that serves the name AND clones from ref audio",
    )
    bake.add_argument(
        "--dequantize",
        action="store_true",
        help="export a quantised base's voice in full precision (it stays quantised otherwise)",
    )
    bake.set_defaults(handler=_guard(_bake))

    job = subparsers.add_parser(
        "run-job",
        help="validate, preprocess, train and bake one job "
        "(what the server runs in a separate process)",
    )
    job.add_argument("--spec", required=True, type=Path)
    job.add_argument(
        "--min-free-bytes",
        type=int,
        help="fail instead of writing a checkpoint that leaves less free disk space than this",
    )
    job.add_argument(
        "--lock-wait-s",
        type=float,
        default=300.0,
        help="how long to wait for another trainer of this job (one whose supervisor died, "
        "checkpointing before it stops) before refusing to run",
    )
    spread = job.add_argument_group("several hosts (families that train data-parallel)")
    spread.add_argument("--hosts", help="comma-separated hosts, one rank each (ssh + IP)")
    spread.add_argument("--ranks", type=int, help="ranks per host")
    spread.add_argument("--port", type=int, help="first TCP port of the ring (one per rank)")
    spread.add_argument("--backend", choices=("ring", "mpi"), default="ring")
    job.set_defaults(handler=_guard(_run_job))


def _guard(handler):
    """Known user errors become one line on stderr and exit status 2, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        from finetune.audio import AudioError
        from finetune.config import ConfigError
        from finetune.data import DataError
        from finetune.families.qwen3_tts.bake import BakeError
        from finetune.fsutil import DiskSpaceError
        from finetune.loading import CheckpointError
        from finetune.lora import AdapterError, LoRAError

        known = (
            CommandError,
            ConfigError,
            DataError,
            CheckpointError,
            AdapterError,
            LoRAError,
            BakeError,
            AudioError,
            DiskSpaceError,
            FileNotFoundError,
        )
        try:
            return handler(args)
        except known as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _preprocess(args: argparse.Namespace) -> int:
    from finetune import data as data_lib
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.families.qwen3_tts.training import codec_encoder, speech_tokenizer_identity

    clips = data_lib.read_jsonl(
        args.input, strategy=args.strategy, max_duration_s=args.max_duration
    )
    loaded = load_qwen3_tts(args.model)
    report = data_lib.preprocess(
        clips, codec_encoder(loaded.model), speech_tokenizer_identity(loaded.path)
    )
    print(json.dumps({"clips": len(clips), "encoded": report.encoded, "skipped": report.skipped}))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "lora.rank": args.lora_rank,
        "trainer.learning_rate": args.lr,
        "trainer.num_epochs": args.epochs,
        "trainer.max_steps": args.max_steps,
        "model.path": args.model,
        "output_dir": args.output,
    }


def _launch_ranks(args: argparse.Namespace, argv: list[str]) -> int | None:
    """With --hosts / --ranks: `python -m finetune <argv>` on every rank through mlx.launch, its
    exit status; None for one rank (this process runs as it always did)."""
    from finetune import distributed

    if args.hosts is None and args.ranks is None:
        return None
    hosts = [h.strip() for h in (args.hosts or "127.0.0.1").split(",")]
    ranks = args.ranks or 1
    if ranks < 1 or not all(hosts):
        raise CommandError("--ranks must be >= 1 and --hosts a list of host names or IPs")
    if len(hosts) * ranks == 1:
        return None
    try:
        return distributed.launch(
            argv,
            hosts,
            ranks_per_host=ranks,
            port=args.port or distributed.DEFAULT_PORT,
            backend=args.backend,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def _launch_train(args: argparse.Namespace) -> int | None:
    """With --hosts / --ranks: the same `train` on every rank through mlx.launch."""
    argv = ["train", "--config", str(args.config.resolve())]
    flags = {
        "--resume": args.resume,
        "--lora-rank": args.lora_rank,
        "--lr": args.lr,
        "--epochs": args.epochs,
        "--max-steps": args.max_steps,
        "--model": args.model,
        "--output": args.output,
        "--progress-file": args.progress_file,
    }
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, str(value.resolve() if isinstance(value, Path) else value)]
    if args.smoke_test:
        argv.append("--smoke-test")
    return _launch_ranks(args, argv)


def _train(args: argparse.Namespace) -> int:
    from finetune import distributed
    from finetune.config import load_config
    from finetune.families import family_entry
    from finetune.progress import ProgressWriter

    launched = _launch_train(args)
    if launched is not None:
        return launched
    # Join the ranks' ring first: a rank that connects before its peer listens backs off for
    # seconds (mlx's ring retries at 1, 2, 4, 8 s), so no rank does slow work before this.
    writer = distributed.is_writer()
    config = load_config(args.config, _overrides(args))
    entry = family_entry(config.model.family)
    progress = (
        ProgressWriter(args.progress_file, stream=sys.stdout) if writer else distributed.Silent()
    )
    workdir = None
    try:
        if args.smoke_test:
            workdir = Path(tempfile.mkdtemp(prefix="vf-smoke-"))
            config = entry.smoke_config(config, workdir, keep_output=args.output is not None)
        result = entry.train(config, progress=progress, resume=args.resume)
    finally:
        progress.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result.status in ("finished", "stopped") else 1


def _fuse(args: argparse.Namespace) -> int:
    from finetune.families.qwen3_tts.bake import check_language_rows
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.families.qwen3_tts.export import (
        LANGUAGE_ROWS_TENSOR,
        export_checkpoint,
        install_language_rows,
        read_language_rows,
    )
    from finetune.lora import fuse_lora, load_adapters, read_adapter_config

    loaded = load_qwen3_tts(args.model)
    language_rows = read_language_rows(args.adapter, read_adapter_config(args.adapter))
    check_language_rows(loaded.model, language_rows, None)
    load_adapters(loaded.model.talker, args.adapter, ignore=(LANGUAGE_ROWS_TENSOR,))
    fused = fuse_lora(loaded.model.talker, requantize=loaded.quantization is not None)
    config = json.loads((loaded.path / "config.json").read_text())
    install_language_rows(loaded.model, config, language_rows)
    export_checkpoint(
        loaded,
        args.output,
        config=config,
        drop_speaker_encoder=loaded.model.speaker_encoder is None,
    )
    print(json.dumps({"output": str(args.output), "fused_layers": len(fused)}))
    return 0


def _bake(args: argparse.Namespace) -> int:
    from finetune.config import load_config
    from finetune.families.qwen3_tts.bake import bake

    config = load_config(args.config)
    result = bake(
        config,
        args.checkpoint,
        args.output,
        name=args.name,
        slot=args.slot,
        force=args.force,
        fuse=not args.no_fuse,
        export=args.export,
        keep_cloning=args.keep_cloning,
        language=args.language,
        dequantize=args.dequantize,
    )
    print(
        json.dumps(
            {
                "package": str(result.package),
                "name": result.name,
                "slot": result.slot,
                "language": result.language,
                "export": str(result.export) if result.export else None,
            }
        )
    )
    return 0


def _launch_run_job(args: argparse.Namespace) -> int | None:
    """With --hosts / --ranks: the same `run-job` on every rank through mlx.launch (rank 0
    reports, checkpoints and bakes; the others train their shards)."""
    argv = ["run-job", "--spec", str(Path(args.spec).resolve())]
    argv += ["--lock-wait-s", str(args.lock_wait_s)]
    if args.min_free_bytes is not None:
        argv += ["--min-free-bytes", str(args.min_free_bytes)]
    return _launch_ranks(args, argv)


def _run_job(args: argparse.Namespace) -> int:
    from finetune import distributed
    from finetune.job import run_job
    from finetune.job_guard import stop_when_orphaned, trainer_lock
    from finetune.progress import Failed, ProgressWriter

    stop_when_orphaned()
    launched = _launch_run_job(args)
    if launched is not None:
        return launched
    if not distributed.is_writer():  # another rank of a launched job: it trains its shards
        return run_job(args.spec, distributed.Silent(), args.min_free_bytes)
    progress = ProgressWriter(stream=sys.stdout)
    try:
        with trainer_lock(Path(args.spec).resolve().parent, args.lock_wait_s):
            return run_job(args.spec, progress, args.min_free_bytes)
    except Exception as exc:  # reported to the server as one line, then handled as before
        progress.emit(Failed(reason=f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        progress.close()
