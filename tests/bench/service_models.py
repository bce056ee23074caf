"""What bench_service.py serves: random Qwen3-TTS checkpoints, a trained voice package for
each, the same voice exported fused (the direct in-process reference), and the direct child.

The "wide" preset (bench-local) has the real 0.6B talker and code-predictor widths (hidden
1024, intermediate 3072, 16 heads / 8 KV heads of 128, text hidden 2048, the full 151,936-row
text vocabulary) with fewer layers: 4 talker layers and 1 code-predictor layer, so a frame runs 4
talker layers and 15 code-predictor passes (real 0.6B: 28 and 75). Its vocoder, speech encoder
and speaker-encoder channels are the tiny preset's. As in the real model, the talker (with its
code predictor) dominates a request; the split is measured and printed.

    python tests/bench/service_models.py direct NAME=EXPORT ...   (the bench runs this)
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TEXT = "The quick brown fox jumps over the lazy dog."
WIDE = "wide"
VOICE = "bench-voice"


def register_wide_preset() -> None:
    from finetune.families.qwen3_tts.tiny import PRESETS

    real, tiny = PRESETS["real-0.6b"], PRESETS["tiny"]
    small_parts = {
        f.name: getattr(tiny, f.name)
        for f in dataclasses.fields(tiny)
        if f.name.startswith(("dec_", "enc_", "spk_"))
    }
    PRESETS.setdefault(
        WIDE,
        dataclasses.replace(real, size_tag="0b6w", layers=4, cp_layers=1, **small_parts),
    )


def _finetune(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"finetune {args[0]} failed: {proc.stderr[-3000:]}")


@dataclasses.dataclass(frozen=True)
class Built:
    model: Path  # the random base checkpoint
    package: Path  # the trained, baked voice package (adapter + speaker row)
    export: Path  # the same voice, adapter fused, as a standalone custom_voice checkpoint
    ref: Path
    language: str | None


def build(preset: str, root: Path) -> tuple[Built, float | None]:
    """The preset's checkpoint, voice package and fused export under `root` (reused when a
    previous run left them complete); the seconds it took, None when reused."""
    from finetune.data import synthetic_dataset
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    register_wide_preset()
    model, package, export = root / "model", root / "package", root / "export"
    done = root / "done.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        return Built(model, package, export, package / "ref.wav", meta["language"]), None
    start = time.perf_counter()
    make_tiny_qwen3_tts(model, seed=0, preset=preset)
    train = synthetic_dataset(root / "clips", 6, seed=0, with_ref=True)
    config = root / "speaker.yaml"
    config.write_text(
        f"model: {{path: '{model}', strategy: speaker}}\n"
        f"data: {{train: ['{train}']}}\n"
        "lora: {rank: 8, alpha: 16.0}\n"
        "trainer: {batch_size: 2, max_steps: 2, learning_rate: 1.0e-3, prefetch: 0}\n"
        f"speaker: {{name: {VOICE}, slot: 3000}}\n"
        f"output_dir: '{root / 'run'}'\n"
    )
    _finetune("train", "--config", str(config))
    checkpoint = root / "run" / "checkpoint-final"
    _finetune(
        "bake",
        "--config",
        str(config),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(package),
        "--export",
        str(export),
    )
    (package / "ref.wav").write_bytes((train.parent / "ref.wav").read_bytes())
    language = json.loads((package / "voice.json").read_text()).get("language")
    done.write_text(json.dumps({"language": language}))
    return Built(model, package, export, package / "ref.wav", language), (
        time.perf_counter() - start
    )


def direct(exports: dict[str, tuple[str, str | None]]) -> None:
    """Serve timing requests on stdin, one a line: `NAME FRAMES SEED [profile]` -> a JSON line
    with the seconds of mlx-audio's own generate on the fused export, the samples made, and
    (with `profile`) the talker and vocoder seconds of that run."""
    import finetune  # noqa: F401  (BLAS preload before mlx)
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    import mlx.core as mx
    import numpy as np

    loaded = {name: load_qwen3_tts(path, serving=True) for name, (path, _) in exports.items()}
    for name, model in loaded.items():
        lang = exports[name][1] or "auto"
        list(model.model.generate(TEXT, voice=VOICE, lang_code=lang, max_tokens=2))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name, frames, seed, *flags = line.split()
        model = loaded[name].model
        lang = exports[name][1] or "auto"
        timer = _VocoderTimer(model.speech_tokenizer) if flags else None
        mx.random.seed(int(seed))
        start = time.perf_counter()
        result = list(model.generate(TEXT, voice=VOICE, lang_code=lang, max_tokens=int(frames)))
        samples = sum(len(np.asarray(r.audio)) for r in result)
        seconds = time.perf_counter() - start
        spent = timer.close() if timer is not None else 0.0
        print(json.dumps({"s": seconds, "samples": samples, "vocoder_s": spent}), flush=True)


class _VocoderTimer:
    """Times the vocoder's `decode` calls of one run (evaluated, so the time is its own)."""

    def __init__(self, vocoder: Any) -> None:
        self.vocoder, self.spent = vocoder, 0.0
        original = vocoder.decode

        def decode(*args: object, **kwargs: object) -> object:
            import mlx.core as mx

            start = time.perf_counter()
            out = original(*args, **kwargs)
            mx.eval(out)
            self.spent += time.perf_counter() - start
            return out

        vocoder.decode = decode

    def close(self) -> float:
        del self.vocoder.decode
        return self.spent


class DirectChild:
    """The direct in-process reference, in its own process so the bench can interleave it
    with the servers' runs."""

    def __init__(self, exports: dict[str, tuple[str, str | None]]) -> None:
        args = [f"{n}={p}={lang or ''}" for n, (p, lang) in exports.items()]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "direct", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self._line()).get("ready")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the direct child exited")
        return line

    def run(self, name: str, frames: int, seed: int, *, profile: bool = False) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{name} {frames} {seed}{' profile' if profile else ''}\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


if __name__ == "__main__" and sys.argv[1:2] == ["direct"]:
    parsed = {}
    for arg in sys.argv[2:]:
        name, path, lang = arg.split("=", 2)
        parsed[name] = (path, lang or None)
    direct(parsed)
