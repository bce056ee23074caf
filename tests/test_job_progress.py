"""The trainer's progress events and the server's reading of them: one tagged union, encoded by
`finetune.progress.ProgressWriter`, decoded by the job runner; a bad line never stops it."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

from finetune.progress import (
    Checkpoint,
    Done,
    Eval,
    Failed,
    LanguageRow,
    NewLanguageRows,
    Package,
    Phase,
    Preprocessed,
    ProgressEvent,
    ProgressWriter,
    Quality,
    Resume,
    Start,
    Step,
    Stopped,
    decode_event,
)

import msgspec
import pytest

from server.jobs.events import public_progress
from server.jobs.runner import MAX_LINE_BYTES, TrainerRun

EVERY_KIND: list[ProgressEvent] = [
    Phase(phase="validate"),
    Preprocessed(encoded=3, skipped=1),
    NewLanguageRows(rows=[LanguageRow("hindi", 2100)]),
    Start(step=0, total_steps=5, trainable_parameters=1234),
    Step(
        step=1,
        total_steps=5,
        epoch=0,
        lr=1e-4,
        samples_per_s=2.5,
        eta_s=3.0,
        loss=2.0,
        grad_norm=0.5,
        main=1.5,
        sub=0.5,
    ),
    Eval(step=1, val_loss=1.9, improved=True),
    Checkpoint(step=1, path="/srv/jobs/x/run/checkpoint-000001"),
    Resume(step=1, checkpoint="/srv/jobs/x/run/checkpoint-last"),
    Quality(step=1, similarity=0.8, preview="/srv/jobs/x/previews/step-000001.wav"),
    Quality(step=0, similarity=None, preview=None, reason="no speaker encoder"),
    Stopped(step=2, checkpoint="/srv/jobs/x/run/checkpoint-last"),
    Done(step=5, checkpoint="/srv/jobs/x/run/checkpoint-final", loss=1.0, best_val=None),
    Package(path="/srv/jobs/x/package"),
    Failed(reason="ConfigError: no clips"),
]


def test_every_event_round_trips_from_the_trainer_to_the_server() -> None:
    out = io.StringIO()
    writer = ProgressWriter(stream=out)
    for event in EVERY_KIND:
        writer.emit(event)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(EVERY_KIND)
    assert [decode_event(line) for line in lines] == EVERY_KIND
    # Every kind is in the union, and each line names its kind in `event`.
    kinds = [msgspec.json.decode(line)["event"] for line in lines]
    assert kinds[:4] == ["phase", "preprocessed", "language_rows", "start"]


def test_clients_see_the_same_fields_without_server_paths() -> None:
    step = public_progress("job1", EVERY_KIND[4])
    assert step["event"] == "step"
    assert {"step", "total_steps", "loss", "main", "sub", "lr", "eta_s", "time"} <= set(step)
    assert "codebook0" not in step  # parts a family does not report are left out
    quality = public_progress("job1", EVERY_KIND[8])
    assert quality["preview"] == "/jobs/job1/previews/1"
    assert public_progress("job1", EVERY_KIND[9])["reason"] == "no speaker encoder"
    for event in EVERY_KIND:
        public = public_progress("job1", event)
        assert not {"path", "checkpoint", "pid"} & set(public)
        assert "/srv/" not in msgspec.json.encode(public).decode()


def test_a_step_lists_its_losses_by_name() -> None:
    assert EVERY_KIND[4].losses() == {"loss": 2.0, "main": 1.5, "sub": 0.5}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "line",
    [
        b"not json at all",
        b'{"event": "step", "step": 1}',  # fields missing
        b'{"event": "warp", "step": 1}',  # an unknown kind
        b'{"event": "phase", "phase": "dreaming"}',  # a value outside the union
        b'{"event": "step", "step": "one", "total_steps": 2}',
        b"[1, 2, 3]",
    ],
)
def test_malformed_lines_are_decode_errors(line: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_event(line)


def _trainer_printing(tmp_path: Path, lines: list[bytes], code: int = 0) -> tuple[str, ...]:
    script = tmp_path / "fake_trainer.py"
    script.write_text(
        "import sys\n"
        f"for line in {lines!r}:\n"
        "    sys.stdout.buffer.write(line + b'\\n')\n"
        "    sys.stdout.flush()\n"
        f"sys.exit({code})\n"
    )
    return (sys.executable, str(script))


def test_malformed_progress_lines_are_counted_and_the_supervisor_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = [msgspec.json.encode(e) for e in (Phase(phase="training"), EVERY_KIND[4])]
    package = msgspec.json.encode(Package(path=str(tmp_path / "package")))
    bad = [
        b'{"event": "step", "step": 1}',
        b'{"event": "warp"}',
        b"{not json",
        b'{"event": "quality", "step": 1, "similarity": "high", "preview": null}',
        b'{"event": "phase", "phase": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}',
    ]
    lines = [bad[0], good[0], bad[1], bad[2], good[1], bad[3], bad[4], package]
    seen: list[ProgressEvent] = []
    job_dir = tmp_path / "job"
    job_dir.mkdir()

    async def supervise() -> object:
        run = TrainerRun("j1", job_dir, seen.append, command=_trainer_printing(tmp_path, lines))
        await run.start()
        return await asyncio.wait_for(run.supervise(), 60)

    outcome = asyncio.run(supervise())
    assert outcome.code == 0  # type: ignore[attr-defined]
    assert outcome.package == str(tmp_path / "package")  # type: ignore[attr-defined]
    assert outcome.rejected_lines == len(bad)  # type: ignore[attr-defined]
    assert [type(e) for e in seen] == [Phase, Step, Package]
    assert "not progress events" in caplog.text
    assert (job_dir / "job.log").read_text().count("\n") == len(lines)


def test_a_handler_that_raises_does_not_stop_the_supervisor(tmp_path: Path) -> None:
    lines = [msgspec.json.encode(Phase(phase="training")), msgspec.json.encode(Package(path="p"))]
    job_dir = tmp_path / "job"
    job_dir.mkdir()

    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("listener bug")

    async def supervise() -> object:
        run = TrainerRun("j2", job_dir, broken, command=_trainer_printing(tmp_path, lines, 3))
        await run.start()
        return await asyncio.wait_for(run.supervise(), 60)

    outcome = asyncio.run(supervise())
    assert outcome.code == 3 and outcome.package == "p"  # type: ignore[attr-defined]
    assert outcome.reason() == "training process exited with code 3"  # type: ignore[attr-defined]
