"""`serve --demo`: a tiny model and three demo voices, built once into the data dir, offline.

Everything heavy runs as `python -m finetune ...` subprocesses (the server never trains, and
only the engine thread touches MLX in the server process).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anyio

from server.registry import Voice
from server.settings import DEMO_MODEL
from server.voices import VoiceService, pack_directory

DEMO_VOICES = ("demo-baked", "demo-adapter", "demo-clone")
# A tiny Sesame CSM beside the Qwen3-TTS one; it serves its builtin speakers csm-tiny-0 / -1.
DEMO_CSM_MODEL = "csm-tiny"


def ensure_demo_model(data: Path) -> Path:
    path = data / "models" / DEMO_MODEL
    if not (path / "config.json").is_file():
        _finetune("make-tiny", "qwen3_tts", str(path), "--seed", "0")
    return path


def ensure_demo_csm_model(data: Path) -> Path:
    path = data / "models" / DEMO_CSM_MODEL
    if not (path / "config.json").is_file():
        _finetune("make-tiny", "csm", str(path), "--seed", "0")
    return path


def _finetune(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"demo set-up failed: finetune {args[0]}: {proc.stderr[-2000:]}")
    return proc.stdout


async def ensure_demo_voices(voices: VoiceService, data: Path) -> list[Voice]:
    missing = [n for n in DEMO_VOICES if not voices.registry.exists(n)]
    if not missing:
        return []
    work = data / "demo"
    package = await anyio.to_thread.run_sync(_build_demo_package, work, data)
    ref = (package / "ref.wav").read_bytes()
    made = []
    if "demo-baked" in missing:
        made.append(
            await voices.import_package(
                pack_directory(package), name="demo-baked", base_model=DEMO_MODEL
            )
        )
    if "demo-adapter" in missing:
        adapter_only = work / "adapter-package"
        if not adapter_only.exists():
            shutil.copytree(package, adapter_only)
            (adapter_only / "speaker_embedding.safetensors").unlink()
            meta = json.loads((adapter_only / "voice.json").read_text())
            meta.pop("slot", None)
            meta["embedding"] = None
            (adapter_only / "voice.json").write_text(json.dumps(meta))
        made.append(
            await voices.import_package(
                pack_directory(adapter_only),
                name="demo-adapter",
                base_model=DEMO_MODEL,
                ref_clip=ref,
            )
        )
    if "demo-clone" in missing:
        made.append(await voices.add_clone("demo-clone", DEMO_MODEL, ref))
    return made


def _build_demo_package(work: Path, data: Path) -> Path:
    from finetune.data import synthetic_dataset

    package = work / "package"
    if (package / "voice.json").is_file():
        return package
    train = synthetic_dataset(work / "clips", 6, seed=0, with_ref=True)
    config = work / "speaker.yaml"
    model = data / "models" / DEMO_MODEL
    config.write_text(
        f"model: {{path: '{model}', strategy: speaker}}\n"
        f"data: {{train: ['{train}']}}\n"
        "lora: {rank: 8, alpha: 16.0}\n"
        "trainer: {batch_size: 2, max_steps: 5, learning_rate: 1.0e-3, prefetch: 0}\n"
        "speaker: {name: demo-baked, slot: 3000}\n"
        f"output_dir: '{work / 'run'}'\n"
    )
    _finetune("train", "--config", str(config))
    _finetune(
        "bake",
        "--config",
        str(config),
        "--checkpoint",
        str(work / "run" / "checkpoint-final"),
        "--output",
        str(package),
    )
    shutil.copy2(train.parent / "ref.wav", package / "ref.wav")
    return package
