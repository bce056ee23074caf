"""The finetune commands as a user runs them (subprocesses, real files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def vf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("config", ["qwen3_tts_speaker.yaml", "qwen3_tts_hindi.yaml"])
def test_smoke_test_trains_each_shipped_config(config):
    proc = vf("train", "--config", f"configs/{config}", "--smoke-test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _events(proc.stdout)
    kinds = [e["event"] for e in events]
    assert kinds.count("step") == 5 and kinds[-1] == "done"
    step = next(e for e in events if e["event"] == "step")
    assert {"step", "total_steps", "loss", "main", "sub", "lr", "samples_per_s", "eta_s"} <= set(
        step
    )


def test_shipped_configs_carry_the_seed_hyper_parameters():
    import yaml

    hindi = yaml.safe_load((ROOT / "configs/qwen3_tts_hindi.yaml").read_text())
    speaker = yaml.safe_load((ROOT / "configs/qwen3_tts_speaker.yaml").read_text())
    t = hindi["trainer"]
    assert hindi["lora"]["rank"] == 8 and t["batch_size"] * t["grad_accumulation"] == 32
    assert t["learning_rate"] == 2e-5 and t["label_smoothing"] == 0.1
    t = speaker["trainer"]
    assert speaker["lora"]["rank"] == 16 and t["batch_size"] * t["grad_accumulation"] == 16
    assert t["num_epochs"] == 3 and t["learning_rate"] == 2e-5
    assert (ROOT / "configs/qwen3_tts_multilingual.yaml").is_file()


def test_bad_configs_get_one_clear_line(tmp_path):
    cases = {
        "unknown.yaml": "model: {path: x}\ndata: {train: [a.jsonl]}\nlorra: {}\n",
        "badyaml.yaml": "model: [unclosed\n",
        "badvalue.yaml": "model: {path: x}\ndata: {train: [a.jsonl]}\nlora: {rank: 0}\n",
        "badtype.yaml": (
            "model: {path: x}\ndata: {train: [a.jsonl]}\ntrainer: {learning_rate: fast}\n"
        ),
    }
    expected = {
        "unknown.yaml": "lorra",
        "badyaml.yaml": "not valid YAML",
        "badvalue.yaml": "lora.rank",
        "badtype.yaml": "learning_rate",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        proc = vf("train", "--config", str(tmp_path / name), "--output", str(tmp_path / "o"))
        assert proc.returncode == 2, (name, proc.stderr)
        assert proc.stderr.startswith("error:") and expected[name] in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_every_bad_data_line_is_reported_and_nothing_is_written(tiny_qwen3_base, tmp_path):
    from finetune.data import synthetic_dataset

    train = synthetic_dataset(tmp_path / "d", 2, seed=0, with_ref=False)
    good = train.read_text().splitlines()[0]
    (tmp_path / "d" / "short.wav").write_bytes(b"")
    lines = [
        good,
        "{not json",
        json.dumps({"audio": "missing.wav", "text": "x"}),
        json.dumps({"audio": "clip_000.wav", "text": "  "}),
    ]
    train.write_text("\n".join(lines) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{path: {tiny_qwen3_base}, strategy: speaker}}\n"
        f"data: {{train: [{train}]}}\noutput_dir: {tmp_path / 'out'}\n"
    )
    proc = vf("train", "--config", str(config))
    assert proc.returncode == 2
    for line_no in (1, 2, 3, 4):  # line 1 lacks ref_audio for the speaker strategy
        assert f"train.jsonl:{line_no}:" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "d").glob("*.codec.npy"))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_qwen3_base, tmp_path):
    from finetune.data import synthetic_dataset

    train = synthetic_dataset(tmp_path / "d", 4, seed=0, with_ref=False)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{path: {tiny_qwen3_base}}}\ndata: {{train: [{train}]}}\n"
        f"trainer: {{max_steps: 100000, learning_rate: 1.0e-4}}\noutput_dir: {tmp_path / 'out'}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", "train", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if '"event": "step"' in line or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = [e for e in _events(out) if e["event"] == "stopped"]
    assert stopped, out[-2000:]
    last = Path(stopped[0]["checkpoint"])
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == stopped[0]["step"] >= 1
    assert (last / "adapters.safetensors").is_file() and (last / "optimizer.safetensors").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_fuse_command_writes_a_loadable_checkpoint(tiny_qwen3_base, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs/qwen3_tts_hindi.yaml").read_text())
    out = tmp_path / "run"
    proc = vf("train", "--config", str(config), "--smoke-test", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = vf(
        "fuse",
        "--model",
        str(tiny_qwen3_base),
        "--adapter",
        str(out / "checkpoint-final"),
        "--output",
        str(tmp_path / "fused"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 7 LoRA layers per talker layer (2 layers) and per code predictor layer (1 layer).
    assert json.loads(proc.stdout)["fused_layers"] == 21
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    fused = load_qwen3_tts(tmp_path / "fused")
    assert list(fused.model.generate("Fused.", ref_audio=None, max_tokens=3))

    proc = vf(
        "fuse",
        "--model",
        str(tiny_qwen3_base),
        "--adapter",
        str(tmp_path / "nope"),
        "--output",
        str(tmp_path / "fused2"),
    )
    assert proc.returncode == 2 and "error:" in proc.stderr
    assert not (tmp_path / "fused2").exists()


def test_preprocess_caches_codes_and_skips_them_next_time(tiny_qwen3_base, tmp_path):
    from finetune.data import synthetic_dataset

    train = synthetic_dataset(tmp_path / "d", 3, seed=2, with_ref=False)
    first = vf("preprocess", "--model", str(tiny_qwen3_base), "--input", str(train))
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout) == {"clips": 3, "encoded": 3, "skipped": 0}
    assert len(list((tmp_path / "d").glob("clip_*.codec.npy"))) == 3
    second = vf("preprocess", "--model", str(tiny_qwen3_base), "--input", str(train))
    assert json.loads(second.stdout) == {"clips": 3, "encoded": 0, "skipped": 3}
