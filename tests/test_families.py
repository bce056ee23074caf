"""The family registry: every family loads, its recipes parse, and everything that validates or
dispatches on a family name derives from `finetune.families.FAMILIES` (a fourth family registered
at runtime is accepted without touching any other list)."""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import finetune
from finetune.config import ConfigError, TrainConfig, load_config
from finetune.families import (
    FAMILIES,
    Family,
    UnknownFamily,
    families_with,
    family_entry,
    get_family,
)
from finetune.families.base import configs_dir

import msgspec
import pytest
import yaml

from server.engine.family import served_class, serves_family, speech_families
from server.settings import SettingsError, load_settings

KNOWN = ("qwen3_tts", "csm", "personaplex")


def _fourth() -> Family:
    return Family(
        name="fourth",
        title="Fourth TTS",
        strategies=("speaker", "chant"),
        engine="speech",
        served_by="server.engine.families.qwen3:Qwen3Model",
        entry="finetune.families.qwen3_tts.entry",
        default_targets=(r"fourth\.layers\.\d+\.proj",),
        presets=("tiny",),
    )


@pytest.fixture
def fourth(monkeypatch: pytest.MonkeyPatch) -> Family:
    family = _fourth()
    monkeypatch.setitem(FAMILIES, family.name, family)
    return family


# --- the registry ------------------------------------------------------------------------------
def test_every_family_loads_with_its_surface() -> None:
    assert tuple(FAMILIES) == KNOWN
    for name, family in FAMILIES.items():
        assert family.name == name and get_family(name) is family
        entry = family_entry(name)
        assert entry is family.entry_module()
        for function in ("make_tiny", "train", "smoke_config", "run_job"):
            assert callable(getattr(entry, function)), (name, function)
        # The presets the registry lists are exactly the ones the family can build.
        tiny = importlib.import_module(f"finetune.families.{name}.tiny")
        assert family.presets == tuple(tiny.PRESETS), name
        assert family.default_targets and all(re.compile(t) for t in family.default_targets)
        served = served_class(name)
        assert served.family == name and callable(served.load)
        assert serves_family(name) == (family.engine == "speech")
    assert set(speech_families()) == {n for n, f in FAMILIES.items() if f.engine == "speech"}
    assert [f.name for f in families_with("duplex")] == ["personaplex"]


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(
        UnknownFamily, match="unknown model family 'nope'; known: " + ", ".join(KNOWN)
    ):
        get_family("nope")


def test_recipes_exist_and_parse_into_train_configs(tmp_path: Path) -> None:
    assert configs_dir() == Path(finetune.__file__).resolve().parents[1] / "configs"
    seen = 0
    for name, family in FAMILIES.items():
        assert family.recipes, f"{name} has no recipe"
        for strategy in family.recipes:
            assert strategy in family.strategies
            assert family.recipe_path(strategy).is_file()
            raw = family.recipe(strategy)
            assert raw["model"]["family"] == name and raw["model"]["strategy"] == strategy
            raw["model"]["path"] = str(tmp_path)
            config = msgspec.convert(raw, TrainConfig)
            assert config.model.path == str(tmp_path)
            assert config.lora_targets == (
                raw.get("lora", {}).get("targets") or list(family.default_targets)
            )
            seen += 1
    assert seen >= 4
    assert get_family("qwen3_tts").recipe("language")["lora"]["rank"] == 8
    with pytest.raises(LookupError, match="no recipe for strategy 'duplex'"):
        get_family("csm").recipe("duplex")


def test_a_family_definition_is_checked() -> None:
    with pytest.raises(ValueError, match="recipes for strategies it does not train: duplex"):
        Family(
            name="bad",
            title="Bad",
            strategies=("speaker",),
            engine="speech",
            served_by="x:Y",
            entry="x",
            default_targets=(),
            presets=(),
            recipes={"duplex": "x.yaml"},
        )
    with pytest.raises(ValueError, match="engine must be one of speech, duplex"):
        Family(
            name="bad",
            title="Bad",
            strategies=("speaker",),
            engine="radio",  # type: ignore[arg-type]
            served_by="x:Y",
            entry="x",
            default_targets=(),
            presets=(),
        )


# --- training configs ----------------------------------------------------------------------------
def _config_file(tmp_path: Path, family: str, strategy: str) -> Path:
    path = tmp_path / "c.yaml"
    model = {"path": str(tmp_path), "family": family, "strategy": strategy}
    path.write_text(yaml.safe_dump({"model": model, "data": {"train": ["a.jsonl"]}}))
    return path


def test_config_refuses_a_strategy_the_family_lacks(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"model\.strategy: csm trains speaker or language, not 'duplex'"
    ):
        load_config(_config_file(tmp_path, "csm", "duplex"))
    with pytest.raises(ConfigError, match="personaplex trains duplex, not 'speaker'"):
        load_config(_config_file(tmp_path, "personaplex", "speaker"))
    with pytest.raises(
        ConfigError, match=r"model\.family: unknown model family 'nope'; known: qwen3_tts"
    ):
        load_config(_config_file(tmp_path, "nope", "speaker"))
    assert (
        load_config(_config_file(tmp_path, "personaplex", "duplex")).model.family == "personaplex"
    )


def test_config_accepts_a_fourth_family_registered_at_runtime(
    tmp_path: Path, fourth: Family
) -> None:
    config = load_config(_config_file(tmp_path, "fourth", "chant"))
    assert config.lora_targets == list(fourth.default_targets)
    with pytest.raises(ConfigError, match="fourth trains speaker or chant, not 'duplex'"):
        load_config(_config_file(tmp_path, "fourth", "duplex"))


def test_make_tiny_choices_follow_the_registry(fourth: Family) -> None:
    from finetune.cli import build_parser

    args = build_parser().parse_args(["make-tiny", "fourth", "out"])
    assert args.family == "fourth"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["make-tiny", "fifth", "out"])


# --- the server ----------------------------------------------------------------------------------
def _settings_file(tmp_path: Path, family: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"path": str(tmp_path), "family": family}}}))
    return path


def test_settings_refuse_an_unknown_family_listing_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(_settings_file(tmp_path, "nope"))
    assert "unknown model family 'nope'; known: qwen3_tts, csm, personaplex" in str(caught.value)
    assert load_settings(_settings_file(tmp_path, "csm")).models["m"].family == "csm"


def test_settings_accept_a_fourth_family_registered_at_runtime(
    tmp_path: Path, fourth: Family
) -> None:
    assert load_settings(_settings_file(tmp_path, "fourth")).models["m"].family == "fourth"
    assert serves_family("fourth") and "fourth" in speech_families()


@dataclass
class _Served:
    family: str


def test_jobs_pick_models_by_the_strategies_of_their_family(tmp_path: Path, fourth: Family) -> None:
    from server.duplex.engine import DuplexEngine
    from server.engine.worker import Engine
    from server.jobs import JobService, _model_kind
    from server.registry import Registry
    from server.voices import VoiceService

    engine, duplex = Engine(max_queue=4, max_batch=1), DuplexEngine()
    engine.models.update({"q": _Served("qwen3_tts"), "c": _Served("csm"), "f": _Served("fourth")})
    duplex.models["p"] = _Served("personaplex")
    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        voices = VoiceService(registry, engine, tmp_path, duplex=duplex)
        jobs = JobService(registry, voices, load_settings(data_dir=str(tmp_path)))
        assert set(jobs._models_for("speaker")) == {"q", "c", "f"}
        assert set(jobs._models_for("language")) == {"q", "c"}
        assert set(jobs._models_for("chant")) == {"f"}
        assert set(jobs._models_for("duplex")) == {"p"}
        assert set(voices.served_models("duplex")) == {"p"}
        assert _model_kind("speaker") == "speech"
        assert _model_kind("duplex") == "PersonaPlex (duplex)"
    finally:
        registry.close()


def test_voice_packages_are_read_by_the_registry(tmp_path: Path, fourth: Family) -> None:
    from finetune.families.qwen3_tts.bake import PACKAGE_FORMAT

    from server.errors import Unprocessable
    from server.voices import _read_meta

    for family, ok in (("fourth", True), ("csm", True), ("nope", False), (["csm"], False)):
        (tmp_path / "voice.json").write_text(
            json.dumps({"format": PACKAGE_FORMAT, "family": family})
        )
        if ok:
            assert _read_meta(tmp_path)["family"] == family
        else:
            with pytest.raises(Unprocessable, match="is not served"):
                _read_meta(tmp_path)


def test_server_never_compares_family_names() -> None:
    names = "|".join(re.escape(n) for n in FAMILIES)
    pattern = re.compile(rf"""[!=]=\s*["']({names})["']|["']({names})["']\s*[!=]=""")
    server = Path(__file__).resolve().parents[1] / "server"
    hits = [
        f"{path.relative_to(server)}:{i}"
        for path in sorted(server.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
