"""Fine-tuning as a service on the tiny model: upload -> first audio of the new voice, and the
job's overhead vs running the same training with the CLI directly (goal <= 1.10).

    python tests/bench/bench_jobs.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import finetune  # noqa: F401
    from finetune.data import synthetic_dataset

    import httpx

    from tests.service_helpers import server_process

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vf-bench-jobs-") as tmp:
        work = Path(tmp)
        from server.demo import ensure_demo_model

        model = ensure_demo_model(work)
        train = synthetic_dataset(work / "clips", 8, seed=1, with_ref=True)
        rows = [json.loads(line) for line in train.read_text().splitlines()]
        clips = [train.parent / r["audio"] for r in rows]
        texts = {p.name: r["text"] for p, r in zip(clips, rows, strict=True)}
        ref = train.parent / "ref.wav"

        settings = {
            "data_dir": str(work / "data"),
            "models": {"tiny": {"path": str(model)}},
            "max_tokens_per_sentence": 25,
        }
        with server_process(settings) as url:
            files = [("clips", (p.name, p.read_bytes(), "audio/wav")) for p in clips]
            files.append(("ref", ("ref.wav", ref.read_bytes(), "audio/wav")))
            data = {
                "name": "benchvoice",
                "strategy": "speaker",
                "transcripts": json.dumps(texts),
                "max_steps": str(args.steps),
            }
            start = time.perf_counter()
            job = httpx.post(f"{url}/voices", files=files, data=data, timeout=120).json()
            while True:
                state = httpx.get(f"{url}/jobs/{job['id']}").json()
                if state["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.1)
            job_done = time.perf_counter()
            assert state["state"] == "succeeded", state
            with httpx.stream(
                "POST",
                f"{url}/speak",
                timeout=120,
                json={
                    "speaker": "benchvoice",
                    "text": "My first words.",
                    "stream": True,
                    "format": "pcm",
                },
            ) as response:
                for chunk in response.iter_bytes():
                    if chunk:
                        break
            first_audio = time.perf_counter()
            job_dir = work / "data" / "jobs" / job["id"]
            spec = json.loads((job_dir / "spec.json").read_text())

        # The same job with the CLI directly, on the same (already validated) clips, with the
        # codes cache the server's job left beside them removed so both encode every clip.
        for cached in job_dir.glob("clips/*.codec.*"):
            cached.unlink()
        spec["config"]["output_dir"] = str(work / "cli-run")
        spec["package_dir"] = str(work / "cli-package")
        (work / "cli-spec.json").write_text(json.dumps(spec))
        start_cli = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "finetune", "run-job", "--spec", str(work / "cli-spec.json")],
            check=True,
            capture_output=True,
        )
        cli = time.perf_counter() - start_cli

    job_s = job_done - start
    print(f"tiny model, 8 clips + 1 ref, {args.steps} LoRA steps")
    print(f"upload -> job succeeded                 {job_s:7.2f} s")
    print(f"upload -> first audio of the new voice  {first_audio - start:7.2f} s")
    print(f"the same job with the CLI directly      {cli:7.2f} s")
    print(f"job overhead ratio                      {job_s / cli:7.2f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
