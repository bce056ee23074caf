"""The Mimi config in Kyutai's form: the file `config.json`'s `mimi_config_name` names.

Kyutai's `moshi.models.loaders.CheckpointInfo` reads `mimi_config_name` and hands that JSON to
`get_mimi` (`seanet` / `quantizer` / `transformer` keyword arguments of its modules); without it
Kyutai builds the real Mimi. Our tiny Mimi is written that way so that `moshi` loads the directory
as it is (tests/parity/test_personaplex_parity.py). mlx-audio's Mimi takes fewer knobs than
Kyutai's: reading such a file refuses every value mlx-audio's codec cannot follow, rather than
load a codec that computes something else.
"""

from __future__ import annotations

from typing import Any

from finetune.families.personaplex.layout import FRAME_RATE, SAMPLE_RATE, merged_mimi

# Values mlx-audio's Mimi (and so ours) hard-codes; a Kyutai config must agree with them.
_FIXED: dict[str, dict[str, Any]] = {
    "": {"sample_rate": SAMPLE_RATE, "channels": 1, "frame_rate": FRAME_RATE},
    "seanet": {
        "channels": 1,
        "causal": True,
        "activation": "ELU",
        "disable_norm_outer_blocks": 0,
        "norm": "none",
    },
    "transformer": {
        "causal": True,
        "conv_layout": True,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
    },
}
# Kyutai seanet key -> ours (mlx-audio's SeanetConfig field names).
_SEANET_KEYS = {
    "dimension": "dimension",
    "n_filters": "nfilters",
    "n_residual_layers": "nresidual_layers",
    "ratios": "ratios",
    "kernel_size": "ksize",
    "residual_kernel_size": "residual_ksize",
    "last_kernel_size": "last_ksize",
    "dilation_base": "dilation_base",
    "pad_mode": "pad_mode",
    "true_skip": "true_skip",
    "compress": "compress",
}
_TRANSFORMER_KEYS = (
    "d_model",
    "num_heads",
    "num_layers",
    "dim_feedforward",
    "context",
    "max_period",
    "layer_scale",
)


def kyutai_mimi_config(section: dict[str, Any] | None) -> dict[str, Any]:
    """Kyutai's `get_mimi` config for our Mimi section (None: the real Mimi's)."""
    data = merged_mimi(section)
    seanet, transformer = data["seanet"], data["transformer"]
    dim = int(seanet["dimension"])
    out: dict[str, Any] = dict(_FIXED[""])
    out["seanet"] = {
        **_FIXED["seanet"],
        **{theirs: seanet[ours] for theirs, ours in _SEANET_KEYS.items()},
    }
    out["seanet"]["ratios"] = list(seanet["ratios"])
    out["quantizer"] = {
        "dimension": int(data["quantizer_dim"]),
        "n_q": int(data["quantizer_nq"]),
        "bins": int(data["quantizer_bins"]),
        "input_dimension": dim,
        "output_dimension": dim,
    }
    out["transformer"] = {
        **_FIXED["transformer"],
        **{key: transformer[key] for key in _TRANSFORMER_KEYS},
        "input_dimension": dim,
        "output_dimensions": [dim],
    }
    return out


def mimi_section_from_kyutai(config: Any) -> dict[str, Any]:
    """Our Mimi section from Kyutai's form; ValueError naming every value we cannot follow."""
    if not isinstance(config, dict):
        raise ValueError("not a JSON object")
    problems: list[str] = []
    parts: dict[str, dict[str, Any]] = {}
    for part in ("seanet", "quantizer", "transformer"):
        value = config.get(part)
        if not isinstance(value, dict):
            problems.append(f"no {part} object")
        parts[part] = value if isinstance(value, dict) else {}
    for part, fixed in _FIXED.items():
        where = config if part == "" else parts.get(part, {})
        for key, expected in fixed.items():
            if key in where and where[key] != expected:
                label = f"{part}.{key}" if part else key
                problems.append(f"{label} is {where[key]!r}; mlx-audio's Mimi has {expected!r}")
    seanet, quantizer, transformer = parts["seanet"], parts["quantizer"], parts["transformer"]
    # Every size is required: Kyutai's module defaults are not the real Mimi's.
    for part, keys in (
        ("seanet", tuple(_SEANET_KEYS)),
        ("quantizer", ("dimension", "n_q", "bins")),
        ("transformer", _TRANSFORMER_KEYS),
    ):
        problems += [f"{part}.{key} is missing" for key in keys if key not in parts[part]]
    dim = seanet.get("dimension")
    for part, key in (
        ("quantizer", "input_dimension"),
        ("quantizer", "output_dimension"),
        ("transformer", "input_dimension"),
        ("transformer", "d_model"),
    ):
        if key in parts[part] and parts[part][key] != dim:
            problems.append(f"{part}.{key} is {parts[part][key]!r}, seanet.dimension is {dim!r}")
    outputs = transformer.get("output_dimensions", [dim])
    if outputs != [dim]:
        problems.append(f"transformer.output_dimensions is {outputs!r}, expected [{dim!r}]")
    if problems:
        raise ValueError("; ".join(problems))
    return {
        "seanet": {ours: seanet[theirs] for theirs, ours in _SEANET_KEYS.items()},
        "transformer": {key: transformer[key] for key in _TRANSFORMER_KEYS},
        "quantizer_nq": quantizer["n_q"],
        "quantizer_bins": quantizer["bins"],
        "quantizer_dim": quantizer["dimension"],
    }
