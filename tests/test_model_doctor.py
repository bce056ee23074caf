"""`voicefoundry doctor MODEL`: each family's tiny checkpoint (both Qwen3 layouts, an 8-bit
variant made by mlx-audio's converter) is described and loaded; broken and unknown directories
list every problem and exit non-zero."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.checkpoint_info import quantization_summary, quantization_text
from finetune.families.personaplex.layout import MIMI_NAME

import pytest

from server.cli import main


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    code = main(["doctor", *args, "--json"])
    as_json = json.loads(capsys.readouterr().out)
    main(["doctor", *args])
    return code, as_json, capsys.readouterr().out


def linked_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """`src` as symlinks, file by file, less `skip` (relative names): cheap to break."""
    for file in src.rglob("*"):
        rel = file.relative_to(src)
        if file.is_file() and str(rel) not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).symlink_to(file)
    return dst


@pytest.fixture(scope="module")
def qwen3_mlx_community(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    out = tmp_path_factory.mktemp("doctor") / "mlx_community"
    return make_tiny_qwen3_tts(out, seed=0, layout="mlx-community")


def test_qwen3_official_base(tiny_qwen3_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, text = doctor(capsys, str(tiny_qwen3_base))
    assert code == 0
    assert (report["family"], report["layout"], report["variant"]) == (
        "qwen3_tts",
        "official",
        "Base",
    )
    assert report["quantization"] is None and report["dtype"] == "bfloat16"
    assert report["size"] == "custom (talker hidden 64, 2 layers)"
    assert report["loads"] is True and report["problems"] == []
    assert report["bytes_on_disk"] > 0
    assert "layout        official" in text and "loads         yes" in text


def test_qwen3_mlx_community(qwen3_mlx_community: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, _ = doctor(capsys, str(qwen3_mlx_community))
    assert code == 0
    assert (report["layout"], report["variant"], report["quantization"]) == (
        "mlx-community",
        "Base",
        None,
    )
    assert report["loads"] is True


def test_qwen3_custom_voice(tiny_qwen3_custom: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, text = doctor(capsys, str(tiny_qwen3_custom))
    assert code == 0 and report["variant"] == "CustomVoice"
    assert "vivian" in report["details"]["speakers"]
    assert "speakers      " in text


def test_qwen3_8bit(tiny_qwen3_q8: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, text = doctor(capsys, str(tiny_qwen3_q8))
    assert code == 0 and report["loads"] is True
    assert report["layout"] == "mlx-community"
    assert report["quantization"] == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert "U32" in report["details"]["stored_dtypes"]  # the packed weights
    assert "quantization  8-bit affine, group size 64" in text


def test_csm(tiny_csm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, _ = doctor(capsys, str(tiny_csm))
    assert code == 0 and report["loads"] is True
    assert (report["family"], report["layout"], report["dtype"]) == (
        "csm",
        "mlx-community",
        "float32",
    )
    assert report["details"]["mimi"] == "mimi/ (local)"


def test_personaplex(tiny_personaplex: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, _ = doctor(capsys, str(tiny_personaplex))
    assert code == 0 and report["loads"] is True
    assert (report["family"], report["layout"], report["dtype"]) == (
        "personaplex",
        "release",
        "bfloat16",
    )
    assert report["details"]["dep_q"] == 16 and report["size"].startswith("custom (dim 64")


def test_broken_qwen3_lists_every_problem(
    tiny_qwen3_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = linked_copy(
        tiny_qwen3_base, tmp_path / "q", skip=("model.safetensors", "speech_tokenizer/config.json")
    )
    (broken / "speech_tokenizer" / "config.json").write_text("{not json")
    code, report, text = doctor(capsys, str(broken))
    assert code == 1 and report["loads"] is False and report["family"] == "qwen3_tts"
    problems = "\n".join(report["problems"])
    assert "model.safetensors is missing" in problems
    assert "speech_tokenizer/config.json is not valid JSON" in problems
    assert "loads         NO" in text and f"problems ({len(report['problems'])})" in text


def test_broken_personaplex_lists_every_problem(
    tiny_personaplex: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = linked_copy(tiny_personaplex, tmp_path / "p", skip=(MIMI_NAME, "config.json"))
    config = json.loads((tiny_personaplex / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "dep_q": 8}))
    code, report, _ = doctor(capsys, str(broken))
    assert code == 1 and report["family"] == "personaplex"
    problems = "\n".join(report["problems"])
    assert f"{MIMI_NAME} is missing" in problems
    assert "dep_q is 8, PersonaPlex has 16" in problems


def test_broken_csm_lists_every_problem(
    tiny_csm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = linked_copy(tiny_csm, tmp_path / "c", skip=("model.safetensors", "config.json"))
    config = json.loads((tiny_csm / "config.json").read_text())
    del config["depth_decoder_config"]
    (broken / "config.json").write_text(json.dumps(config))
    code, report, _ = doctor(capsys, str(broken))
    assert code == 1 and report["family"] == "csm"
    problems = "\n".join(report["problems"])
    assert "model.safetensors is missing" in problems
    assert "config.json lacks depth_decoder_config" in problems


def test_unknown_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, report, text = doctor(capsys, str(tmp_path))
    assert code == 1 and report["family"] is None and report["loads"] is False
    assert report["problems"] == [
        "not a checkpoint of any known family (qwen3_tts, csm, personaplex): "
        "config.json model_type is 'llama'"
    ]
    assert "family        unknown" in text
    code, report, _ = doctor(capsys, str(tmp_path / "absent"))
    assert code == 1 and report["problems"] == ["no such model directory"]


def test_configured_name(
    tiny_csm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "settings.json"
    models = {"voice": {"path": str(tiny_csm), "family": "csm"}, "wrong": {"path": str(tiny_csm)}}
    config.write_text(json.dumps({"models": models}))
    code, report, _ = doctor(capsys, "voice", "--config", str(config), "--no-load")
    assert code == 0 and report["model"] == "voice" and report["path"] == str(tiny_csm)
    # The settings' family (the default, qwen3_tts) is not what the directory holds.
    code, report, _ = doctor(capsys, "wrong", "--config", str(config), "--no-load")
    assert code == 1 and report["expected_family"] == "qwen3_tts"
    assert "the settings say family 'qwen3_tts', the directory holds 'csm'" in report["problems"]
    assert main(["doctor", "nothing", "--config", str(config)]) == 2
    assert "is neither a directory nor a model in" in capsys.readouterr().err


def test_doctor_without_model_keeps_the_runtime_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "--no-measure"]) == 0
    assert "model" not in json.loads(capsys.readouterr().out)


def test_mixed_quantization_summary() -> None:
    # config.json's object as mlx-audio's converter writes it with --quant-predicate mixed_4_6.
    quant = {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "talker.model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6, "mode": "affine"},
        "talker.model.layers.1.mlp.down_proj": {"group_size": 64, "bits": 4, "mode": "affine"},
        "talker.model.layers.1.mlp.up_proj": {"group_size": 64, "bits": 4, "mode": "affine"},
    }
    summary = quantization_summary(quant)
    assert summary == {
        "bits": 4,
        "group_size": 64,
        "mode": "affine",
        "mixed": {"4-bit": 2, "6-bit": 1},
    }
    assert quantization_text(summary) == (
        "4-bit affine, group size 64; mixed predicate: 2 layers 4-bit, 1 layers 6-bit"
    )
    assert quantization_text(None) == "none"
