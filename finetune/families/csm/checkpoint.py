"""Load a CSM checkpoint through mlx-audio's real path, offline, with our local Mimi, loudly.

mlx-audio's sesame `Model.__init__` always fetches Kyutai's Mimi from the hub and builds the text
tokenizer from `config["text_tokenizer"]` (a hub id, or a path relative to the working
directory) or from the hub's Llama-3.2 tokenizer. Here, for the length of the load only, those
two names inside mlx-audio's sesame module resolve locally: Mimi is the checkpoint's own
(`mimi/`) or the real one from the local hub cache, a relative `text_tokenizer` is read from the
checkpoint folder. The hub is offline throughout. Every problem found (config, weights against
the module tree, tokenizer, codec) is collected into one CheckpointError.

A LoadedCsm holds mutable generation state (the backbone / decoder KV caches, the Mimi
streaming decoder): use it from one thread, one generation at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.arrays import flat_items, load_arrays
from finetune.families.csm.mimi import SAMPLE_RATE, load_mimi
from finetune.families.csm.text_tokenizer import BOS_TOKEN, EOS_TOKEN
from finetune.loading import (
    CheckpointError,
    captured_output,
    offline_hub,
    read_config,
    resolve_model_path,
    tail,
)
from finetune.runtime import PreparedModel, prepare_model
from finetune.runtime.accelerate import to_float32
from finetune.runtime.half import bf16_linears
from finetune.variants import describe, quantize_loaded

import mlx.core as mx
import mlx.nn as nn

FAMILY = "csm"
MODEL_TYPES = ("csm", "sesame")
WEIGHTS_FILE = "model.safetensors"
# mlx-audio's fallback when the config names no text tokenizer.
DEFAULT_TEXT_TOKENIZER = "unsloth/Llama-3.2-1B"
REQUIRED_KEYS = (
    "audio_num_codebooks",
    "audio_vocab_size",
    "text_vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "depth_decoder_config",
)

# The patched names are module globals of mlx-audio's sesame module: one load at a time.
_LOAD_LOCK = threading.Lock()


@dataclass
class LoadedCsm:
    path: Path
    model: Any  # mlx_audio.tts.models.sesame.sesame.Model (fp32, eval)
    tokenizer: Any  # adds <|begin_of_text|> / <|end_of_text|> around each segment
    mimi: Any  # mlx_audio.codec.models.mimi.Mimi, the model's own audio tokenizer
    config: dict[str, Any]
    sample_rate: int = SAMPLE_RATE
    runtime: PreparedModel | None = None

    @property
    def backbone(self) -> Any:
        """The SesameModel (`model.model`): the LoRA root and what training differentiates."""
        return self.model.model

    @property
    def num_codebooks(self) -> int:
        return int(self.config["audio_num_codebooks"])

    @property
    def audio_vocab_size(self) -> int:
        return int(self.config["audio_vocab_size"])

    @property
    def quantization(self) -> dict[str, Any] | None:
        """config.json's quantization (mlx-audio's converter writes it), None: full precision."""
        quant = self.config.get("quantization", self.config.get("quantization_config"))
        return quant if isinstance(quant, dict) else None

    def base_model_info(self) -> dict[str, Any]:
        """What adapters and voice packages record about the base model they belong to (a voice
        trained on a quantised variant says so)."""
        return {
            "path": str(self.path),
            "family": FAMILY,
            "hidden_size": int(self.config["hidden_size"]),
            "num_hidden_layers": int(self.config["num_hidden_layers"]),
            "audio_num_codebooks": self.num_codebooks,
            "quantization": self.quantization,
        }


def load_csm(name: str | Path, *, serving: bool = False) -> LoadedCsm:
    """Load and verify a checkpoint; `serving`: for inference only (a bf16 checkpoint's Linear
    layers stay bf16 on the CPU backend, finetune/runtime/half.py), not for training."""
    from mlx_audio.tts.utils import load_model

    path = resolve_model_path(name)
    config = read_config(path)
    problems = _config_problems(config)
    if problems:
        raise CheckpointError(path, problems)

    problems += _weight_problems(path, config)
    mimi, mimi_problems = load_mimi(path, int(config["audio_num_codebooks"]))
    problems += mimi_problems
    tokenizer_name = _tokenizer_location(path, config)
    if isinstance(tokenizer_name, Path) and not (tokenizer_name / "tokenizer.json").is_file():
        problems.append(f"text tokenizer {tokenizer_name} has no tokenizer.json")
    if problems:
        raise CheckpointError(path, problems)

    with _LOAD_LOCK, offline_hub(), captured_output() as printed, _local_assets(path, mimi):
        try:
            model = load_model(path)
        except Exception as exc:  # mlx-audio raises ValueError / KeyError / OSError here
            detail = tail(printed.getvalue())
            raise CheckpointError(
                path, [f"{type(exc).__name__}: {exc}" + (f" ({detail})" if detail else "")]
            ) from exc

    problems = []
    if model._audio_tokenizer is not mimi:
        problems.append("mlx-audio did not take the local Mimi")
    tokenizer = model._text_tokenizer
    problems += ensure_segment_template(tokenizer)
    if problems:
        raise CheckpointError(path, problems)

    assert mimi is not None
    to_float32(mimi)
    # The backbone and the depth decoder run frame by frame, reading every weight a step.
    half = bf16_linears(model) if serving else []
    runtime = prepare_model(model, bf16_layers=half, fp32_everywhere=True)
    mx.eval(model.parameters())
    model.eval()
    return LoadedCsm(
        path=path, model=model, tokenizer=tokenizer, mimi=mimi, config=config, runtime=runtime
    )


def _config_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    if config.get("model_type") not in MODEL_TYPES:
        problems.append(f"model_type is {config.get('model_type')!r}, not csm")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        problems.append(f"config.json lacks {', '.join(missing)}")
    elif int(config["audio_num_codebooks"]) < 2:
        problems.append("audio_num_codebooks must be >= 2 (codebook 0 + the depth decoder's)")
    depth = config.get("depth_decoder_config")
    if depth is not None and not isinstance(depth, dict):
        problems.append("depth_decoder_config is not an object")
    elif isinstance(depth, dict) and "rope_scaling" not in depth:
        problems.append("depth_decoder_config lacks rope_scaling")
    return problems


def _weight_problems(path: Path, config: dict[str, Any]) -> list[str]:
    """Every missing, unexpected or mis-shaped tensor, against a freshly built module tree."""
    from mlx_audio.tts.models.sesame.sesame import Model, SesameModel

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return [f"no *.safetensors weights (expected {WEIGHTS_FILE})"]
    raw: dict[str, mx.array] = {}
    problems: list[str] = []
    for file in files:
        try:
            raw.update(load_arrays(file))
        except Exception as exc:  # mx.load raises RuntimeError / ValueError on corrupt files
            problems.append(f"{file.name} is unreadable: {exc}")
    if problems:
        return problems
    # Model.sanitize does not touch `self`: the checkpoint's keys as mlx-audio will load them.
    weights = Model.sanitize(None, raw)
    try:
        tree = _Root(SesameModel(config))  # lazily allocated: comparing shapes costs no memory
    except Exception as exc:  # a config mlx-audio cannot build from
        return [f"config.json does not describe a CSM model ({type(exc).__name__}: {exc})"]
    quant = config.get("quantization", config.get("quantization_config"))
    if isinstance(quant, dict):  # a converter variant: the tree mlx-audio quantises to load it
        try:
            scaled = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
            quantize_loaded(tree, quant, lambda p, m: not p.startswith("_audio_tokenizer"), scaled)
        except (KeyError, TypeError, ValueError) as exc:
            return [f"config.json quantization {quant} does not apply ({exc})"]
    params = dict(flat_items(tree.parameters()))
    expected = {k: v.shape for k, v in params.items()}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"{len(missing)} weights missing, e.g. {', '.join(missing[:4])}")
    if extra:
        problems.append(f"{len(extra)} unexpected weights, e.g. {', '.join(extra[:4])}")
    for key in sorted(set(expected) & set(weights)):
        if tuple(weights[key].shape) != tuple(expected[key]):
            problems.append(
                f"{key} has shape {tuple(weights[key].shape)}, expected {tuple(expected[key])}"
            )
        elif mx.issubdtype(params[key].dtype, mx.floating) != mx.issubdtype(
            weights[key].dtype, mx.floating
        ):
            want = "a float type" if mx.issubdtype(params[key].dtype, mx.floating) else "uint32"
            problems.append(f"{key} has dtype {weights[key].dtype}, expected {want}")
    if isinstance(quant, dict) and not any(k.endswith(".scales") for k in weights):
        problems.append(f"config.json says quantised ({describe(quant)}) but no weight is")
    return problems


class _Root(nn.Module):
    """The module tree as mlx-audio's sesame `Model` roots it (`model.` + SesameModel)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _tokenizer_location(path: Path, config: dict[str, Any]) -> Path | str:
    """A local folder for a relative `text_tokenizer`, else the hub id (read from the cache)."""
    name = config.get("text_tokenizer") or DEFAULT_TEXT_TOKENIZER
    local = Path(name).expanduser()
    if not local.is_absolute():
        local = path / local
    return local.resolve() if local.is_dir() else str(name)


class _LocalMimi:
    """Stands in for mlx-audio's `Mimi` class name while a Model is built: hands it ours."""

    def __init__(self, mimi: Any) -> None:
        self._mimi = mimi

    def from_pretrained(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        return self._mimi


class _LocalAutoTokenizer:
    """Stands in for `AutoTokenizer` in mlx-audio's sesame module: relative names are local."""

    def __init__(self, checkpoint: Path) -> None:
        self._checkpoint = checkpoint

    def from_pretrained(self, name: str, *args: Any, **kwargs: Any) -> Any:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        location = _tokenizer_location(self._checkpoint, {"text_tokenizer": name})
        if isinstance(location, Path) and read_config(location).get("model_type") == "sesame":
            # mlx-audio's converter renames the model type `sesame`, which transformers does
            # not know: hand it a plain config so tokenizer_config.json's class is used.
            from transformers import PretrainedConfig

            kwargs.setdefault("config", PretrainedConfig())
        # transformers also parses config.json on the way and warns about CSM's token ids.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(location), *args, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _local_assets(checkpoint: Path, mimi: Any) -> Iterator[None]:
    from mlx_audio.tts.models.sesame import sesame

    saved = {"Mimi": sesame.Mimi, "AutoTokenizer": sesame.AutoTokenizer}
    sesame.Mimi = _LocalMimi(mimi)
    sesame.AutoTokenizer = _LocalAutoTokenizer(checkpoint)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(sesame, name, value)


PROBE_TEXT = "[0]Hello."


def ensure_segment_template(tokenizer: Any) -> list[str]:
    """Sesame wraps every text segment as `bos text eos`; install that template if missing
    (as mlx-audio's `load_llama3_tokenizer` does); returns problems."""
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if not isinstance(bos_id, int) or not isinstance(eos_id, int) or bos_id == eos_id:
        return [f"text tokenizer has no {BOS_TOKEN} / {EOS_TOKEN} tokens"]
    ids = tokenizer.encode(PROBE_TEXT)
    if ids[:1] != [bos_id] or ids[-1:] != [eos_id]:
        from tokenizers.processors import TemplateProcessing

        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0",
            pair=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0 {BOS_TOKEN}:1 $B:1 {EOS_TOKEN}:1",
            special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
        )
        ids = tokenizer.encode(PROBE_TEXT)
    if ids[:1] != [bos_id] or ids[-1:] != [eos_id] or len(ids) < 3:
        return [f"text tokenizer does not wrap segments in {BOS_TOKEN} ... {EOS_TOKEN}"]
    if tokenizer.decode(ids[1:-1]) != PROBE_TEXT:
        return [f"text tokenizer does not round-trip {PROBE_TEXT!r}"]
    return []
