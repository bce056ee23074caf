"""Shared fixtures: tiny models are built once per test session, never per test."""

from __future__ import annotations

from pathlib import Path

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)

import pytest


@pytest.fixture(scope="session")
def tiny_qwen3_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    return make_tiny_qwen3_tts(tmp_path_factory.mktemp("models") / "qwen3_base", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_custom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    out = tmp_path_factory.mktemp("models") / "qwen3_custom"
    return make_tiny_qwen3_tts(out, variant="custom_voice", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3_design(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VoiceDesign checkpoint, in the mlx-community layout (CustomVoice above: official)."""
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    out = tmp_path_factory.mktemp("models") / "qwen3_design"
    return make_tiny_qwen3_tts(out, variant="voice_design", seed=2, layout="mlx-community")


@pytest.fixture(scope="session")
def loaded_qwen3_base(tiny_qwen3_base: Path):
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    return load_qwen3_tts(tiny_qwen3_base)


@pytest.fixture(scope="session")
def small_qwen3_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A somewhat larger tiny model, for tests that must overfit a couple of clips."""
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    out = tmp_path_factory.mktemp("models") / "qwen3_small"
    return make_tiny_qwen3_tts(out, seed=0, preset="small")


@pytest.fixture(scope="session")
def tiny_csm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.csm.tiny import make_tiny_csm

    return make_tiny_csm(tmp_path_factory.mktemp("models") / "csm_tiny", seed=0)


@pytest.fixture(scope="session")
def loaded_csm(tiny_csm: Path):
    from finetune.families.csm.checkpoint import load_csm

    return load_csm(tiny_csm)


@pytest.fixture(scope="session")
def tiny_personaplex(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.personaplex.tiny import make_tiny_personaplex

    out = tmp_path_factory.mktemp("models") / "personaplex_tiny"
    return make_tiny_personaplex(out, seed=0)


@pytest.fixture(scope="session")
def loaded_personaplex(tiny_personaplex: Path):
    from finetune.families.personaplex.checkpoint import load_personaplex

    return load_personaplex(tiny_personaplex)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir that a real `serve --demo` process built from nothing (its models and demo
    voices), once per session; modules serve copies of it (`service_helpers.copy_demo_data`)."""
    from tests.service_helpers import server_process

    data = tmp_path_factory.mktemp("demo_build") / "data"
    with server_process({"demo": True, "data_dir": str(data)}, timeout=600):
        pass
    return data


@pytest.fixture(scope="session")
def speaker_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic clips of one 'speaker' with a ref clip: train.jsonl (+ val.jsonl)."""
    from finetune.data import synthetic_dataset

    return synthetic_dataset(tmp_path_factory.mktemp("speaker_data"), 6, seed=3, with_ref=True)


@pytest.fixture(scope="session")
def voice_package(tiny_qwen3_base: Path, speaker_dataset: Path, tmp_path_factory) -> Path:
    """A real voice package: 2 LoRA steps of the speaker strategy, then `bake`."""
    import io

    from finetune.config import (
        DataSection,
        LoRASection,
        ModelSection,
        SpeakerSection,
        TrainConfig,
        TrainerSection,
    )
    from finetune.families.qwen3_tts.bake import bake
    from finetune.families.qwen3_tts.training import prepare_run
    from finetune.progress import ProgressWriter

    work = tmp_path_factory.mktemp("voice_package")
    config = TrainConfig(
        model=ModelSection(path=str(tiny_qwen3_base), strategy="speaker"),
        data=DataSection(train=[str(speaker_dataset)]),
        lora=LoRASection(rank=4, alpha=8.0),
        trainer=TrainerSection(batch_size=2, max_steps=2, learning_rate=5e-3, prefetch=0),
        speaker=SpeakerSection(name="packaged", slot=3000),
        output_dir=str(work / "run"),
    )
    run = prepare_run(config, progress=ProgressWriter(stream=io.StringIO()))
    run.trainer.train()
    return bake(config, work / "run" / "checkpoint-final", work / "package").package


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_qwen3_q8(tiny_qwen3_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_qwen3_base` quantised to 8 bits by mlx-audio's own converter (run offline)."""
    from finetune.families.qwen3_tts.quantize import quantize_checkpoint

    return quantize_checkpoint(tiny_qwen3_base, tmp_path_factory.mktemp("models") / "q8", 8)


@pytest.fixture(scope="session")
def tiny_qwen3_q4(tiny_qwen3_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.qwen3_tts.quantize import quantize_checkpoint

    return quantize_checkpoint(tiny_qwen3_base, tmp_path_factory.mktemp("models") / "q4", 4)


# PostgreSQL for the registry's tests: the server deploy/start-postgres.sh starts (`make test`
# runs it), or VF_TEST_POSTGRES (a SQLAlchemy URL of a role that may create databases).
POSTGRES_SERVER = "postgresql+psycopg://voicefoundry:voicefoundry@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh database on the test PostgreSQL server, dropped at the end of the session; its
    URL. The server not answering is a failure, never a skip."""
    import os
    import uuid

    import sqlalchemy as sa

    server = sa.make_url(os.environ.get("VF_TEST_POSTGRES", POSTGRES_SERVER))
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"vf_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not running: bash deploy/start-postgres.sh ({exc.orig})",
            pytrace=False,
        )
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
