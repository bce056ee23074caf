"""Training configuration files (YAML), decoded into typed structs with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

QWEN3_TALKER_TARGETS = [
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
]
QWEN3_CODE_PREDICTOR_TARGETS = [
    r"code_predictor\.model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"code_predictor\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
]

# PersonaPlex / Moshi: temporal attention and the depformer bridge. `depformer.slices.N.linear_in`
# is matched in full: a bare `linear_in` would also hit every gating MLP.
PERSONAPLEX_TARGETS = [
    r"transformer\.layers\.\d+\.self_attn\.(in_proj|out_proj)",
    r"depformer\.slices\.\d+\.linear_in",
]


class ConfigError(ValueError):
    pass


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelSection(Strict):
    path: str
    family: str = "qwen3_tts"  # a name in finetune.families.FAMILIES
    strategy: str = "language"  # one of that family's strategies


class DataSection(Strict):
    train: list[str]
    val: list[str] = []
    min_duration_s: float = 0.5
    max_duration_s: float = 30.0


class QuantizeSection(Strict):
    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 64


class LoRASection(Strict):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None  # None: the family's default targets
    train_code_predictor: bool = True  # codebooks 1-15 carry much of the timbre
    quantize: QuantizeSection | None = None


class TrainerSection(Strict):
    batch_size: int = 2
    grad_accumulation: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    num_epochs: int = 1
    max_steps: int | None = None
    label_smoothing: float = 0.0
    sub_talker_weight: float = 0.3
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 3
    # A checkpoint that would leave less than this free on its disk fails the run (0: off).
    min_free_bytes: int = 0
    seed: int = 0
    prefetch: int = 2


class SpeakerSection(Strict):
    name: str = "custom_speaker"
    slot: int = 3000


class CsmSection(Strict):
    """Sesame CSM: LoRA on the backbone, optionally on the depth decoder."""

    train_decoder: bool = True  # the depth decoder makes codebooks 1..N-1
    decoder_loss_weight: float = 0.5  # weight of the depth decoder's codebooks 1..N-1
    speaker_id: int = 0
    # Share of audio frames the depth decoder is trained on per batch (Sesame's "compute
    # amortization" used 1/16); at least one frame per batch.
    decoder_frame_fraction: float = 1.0
    context_clips: int = 1  # training clips copied into a voice package as generation context


class PersonaPlexSection(Strict):
    """PersonaPlex (Moshi): LoRA on temporal attention and the depformer bridge."""

    freeze_text_linear: bool = True
    train_audio_embs: bool = True
    train_out_norm: bool = True
    text_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    text_padding_weight: float = 0.5  # weight of PAD / EPAD text targets relative to words
    user_audio_loss_weight: float = 0.0  # 0: the user's codebooks are not predicted in training


class QualitySection(Strict):
    """The quality report: a preview and its speaker similarity at step 0 and at every saved
    checkpoint (`finetune.quality`). Off by default (CLI runs stay fast); server jobs turn it on.
    """

    enabled: bool = False
    preview_text: str | None = None  # None: the first training clip's transcript
    max_frames: int = 240  # absolute cap on a preview's codec frames (also <= 2x the longest clip)
    previews_dir: str | None = None  # None: `<output_dir>/previews`


class TrainConfig(Strict):
    model: ModelSection
    data: DataSection
    lora: LoRASection = msgspec.field(default_factory=LoRASection)
    trainer: TrainerSection = msgspec.field(default_factory=TrainerSection)
    speaker: SpeakerSection = msgspec.field(default_factory=SpeakerSection)
    csm: CsmSection = msgspec.field(default_factory=CsmSection)
    personaplex: PersonaPlexSection = msgspec.field(default_factory=PersonaPlexSection)
    quality: QualitySection = msgspec.field(default_factory=QualitySection)
    output_dir: str = "checkpoints/run"

    @property
    def lora_targets(self) -> list[str]:
        """The configured LoRA target patterns, or the family's defaults."""
        if self.lora.targets is not None:
            return list(self.lora.targets)
        from finetune.families import get_family

        return list(get_family(self.model.family).default_targets)

    def __post_init__(self) -> None:
        from finetune.families import FAMILIES, unknown_family_message

        problems = []
        family = FAMILIES.get(self.model.family)
        if family is None:
            problems.append(f"model.family: {unknown_family_message(self.model.family)}")
        elif self.model.strategy not in family.strategies:
            problems.append(
                f"model.strategy: {family.name} trains {' or '.join(family.strategies)}, "
                f"not {self.model.strategy!r}"
            )
        if self.lora.rank < 1:
            problems.append("lora.rank must be >= 1")
        if not 0.0 <= self.lora.dropout < 1.0:
            problems.append("lora.dropout must be in [0, 1)")
        if self.trainer.batch_size < 1:
            problems.append("trainer.batch_size must be >= 1")
        if not 0.0 <= self.trainer.label_smoothing < 1.0:
            problems.append("trainer.label_smoothing must be in [0, 1)")
        if not 0 <= self.speaker.slot < 3072:
            problems.append("speaker.slot must be a codec_embedding row (0-3071)")
        if self.quality.max_frames < 1:
            problems.append("quality.max_frames must be >= 1")
        if self.data.min_duration_s >= self.data.max_duration_s:
            problems.append("data.min_duration_s must be below data.max_duration_s")
        for name in PersonaPlexSection.__struct_fields__:
            value = getattr(self.personaplex, name)
            if name.endswith("_weight") and value < 0:
                problems.append(f"personaplex.{name} must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (relative paths in it are relative to the working directory)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        target = raw.setdefault(section, {}) if section else raw
        target[key] = value
    try:
        config = msgspec.convert(raw, TrainConfig)
    except (msgspec.ValidationError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config
