"""What a PersonaPlex checkpoint directory holds, and the constants its generator relies on.

File names and the 7B model's dimensions follow NVIDIA's `moshi/models/loaders.py`
(`nvidia/personaplex-7b-v1`). The language-model config uses the flat Kyutai keys that
mlx-audio's `LmConfig.from_config_dict` reads; a directory without `config.json` (or whose
`config.json` has no `dim`) gets the real 7B dims, as the MLX port does. A Mimi that is not the real
one (`mimi_202407`) is described by the file `config.json`'s `mimi_config_name` names, in Kyutai's
form, so Kyutai's `moshi` loads the directory as it is; directories written before that carry our
own `mimi` section instead, still read.
"""

from __future__ import annotations

import copy
from typing import Any

MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
CONFIG_NAME = "config.json"
# Kyutai's `mimi_config_name`: the codec's config in `moshi.models.loaders.get_mimi`'s form, written
# only for a Mimi that is not the real one (`kyutai_mimi.py`).
MIMI_CONFIG_NAME = "mimi_config.json"

SAMPLE_RATE = 24000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples per 80 ms step
STREAM_CODEBOOKS = 8  # Mimi codebooks per audio stream (agent, user)
MIMI_FILE_CODEBOOKS = 32  # the Mimi checkpoint stores 32; PersonaPlex uses the first 8

# Text ids of the SentencePiece model the generator relies on (`tokenizer_spm_32k_3.model`).
TEXT_EPAD_ID = 0  # end-of-padding marker (also SentencePiece's <unk>)
TEXT_BOS_ID = 1
TEXT_EOS_ID = 2
TEXT_PAD_ID = 3  # padding; the text token forced during voice prompt and spacers
SYSTEM_TAG = "<system>"

# Mimi codes of an agent-silence frame and of a 440 Hz sine frame (user stream), as hard-coded
# in NVIDIA's `lm.py`; they are used verbatim for every checkpoint.
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
SPACER_SECONDS = 0.5

PERSONAPLEX_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]

# NVIDIA `_lm_kwargs` with PersonaPlex's dep_q = 16.
PERSONAPLEX_7B_LM: dict[str, Any] = {
    "dim": 4096,
    "text_card": 32000,
    "existing_text_padding_id": TEXT_PAD_ID,
    "n_q": 16,
    "dep_q": 16,
    "card": 2048,
    "num_heads": 32,
    "num_layers": 32,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 3000,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_dim_feedforward": int(4.125 * 1024),
    "depformer_num_heads": 16,
    "depformer_num_layers": 6,
    "depformer_causal": True,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": list(PERSONAPLEX_DELAYS),
}

# mlx-audio's `mimi_202407` as plain data (the real Mimi; `quantizer_nq` is the file's count).
REAL_MIMI: dict[str, Any] = {
    "seanet": {
        "dimension": 512,
        "channels": 1,
        "causal": True,
        "nfilters": 64,
        "nresidual_layers": 1,
        "ratios": [8, 6, 5, 4],
        "ksize": 7,
        "residual_ksize": 3,
        "last_ksize": 3,
        "dilation_base": 2,
        "pad_mode": "constant",
        "true_skip": True,
        "compress": 2,
    },
    "transformer": {
        "d_model": 512,
        "num_heads": 8,
        "num_layers": 8,
        "dim_feedforward": 2048,
        "context": 250,
        "max_period": 10000,
        "layer_scale": 0.01,
    },
    "quantizer_nq": MIMI_FILE_CODEBOOKS,
    "quantizer_bins": 2048,
    "quantizer_dim": 256,
}


def real_lm_config_dict() -> dict[str, Any]:
    return copy.deepcopy(PERSONAPLEX_7B_LM)


def lm_config(data: dict[str, Any]) -> Any:
    """mlx-audio's LmConfig from flat Kyutai keys (KeyError / TypeError on a bad dict).

    Kyutai's and NVIDIA's `LMModel` discard `depformer_context` (its depformer attends to every
    earlier slice of the step); mlx-audio's attention honours it, keeping only the last 8 slices'
    keys, which changes the logits of slices 9..15 (the user's codebooks). It is set to dep_q
    here so the depformer sees what the reference's does (tests/parity/test_personaplex_parity).
    """
    from mlx_audio.sts.models.moshi.lm import LmConfig

    return LmConfig.from_config_dict({**data, "depformer_context": data["dep_q"]})


def merged_mimi(section: dict[str, Any] | None) -> dict[str, Any]:
    """REAL_MIMI with a Mimi section's values over it (None: the real Mimi)."""
    data = copy.deepcopy(REAL_MIMI)
    if section is not None:
        data["seanet"].update(section.get("seanet", {}))
        data["transformer"].update(section.get("transformer", {}))
        for key in ("quantizer_nq", "quantizer_bins", "quantizer_dim"):
            if key in section:
                data[key] = section[key]
    return data


def mimi_config(section: dict[str, Any] | None) -> Any:
    """mlx-audio's MimiConfig for the Mimi *file* (all its codebooks); None -> the real Mimi."""
    from mlx_audio.codec.models.mimi.mimi import MimiConfig
    from mlx_audio.codec.models.mimi.modules import SeanetConfig, TransformerConfig

    data = merged_mimi(section)
    seanet = SeanetConfig(**data["seanet"])
    t = data["transformer"]
    transformer = TransformerConfig(
        d_model=int(t["d_model"]),
        num_heads=int(t["num_heads"]),
        num_layers=int(t["num_layers"]),
        causal=True,
        norm_first=True,
        bias_ff=False,
        bias_attn=False,
        layer_scale=t["layer_scale"],
        positional_embedding="rope",
        use_conv_bias=True,
        gating=False,
        norm="layer_norm",
        context=int(t["context"]),
        max_period=int(t["max_period"]),
        max_seq_len=8192,
        kv_repeat=1,
        dim_feedforward=int(t["dim_feedforward"]),
        conv_layout=True,
        use_conv_block=False,
        cross_attention=False,
        conv_kernel_size=3,
    )
    return MimiConfig(
        channels=1,
        sample_rate=SAMPLE_RATE,
        frame_rate=FRAME_RATE,
        renormalize=True,
        seanet=seanet,
        transformer=transformer,
        quantizer_nq=int(data["quantizer_nq"]),
        quantizer_bins=int(data["quantizer_bins"]),
        quantizer_dim=int(data["quantizer_dim"]),
    )


def spacer_steps() -> int:
    return int(SPACER_SECONDS * FRAME_RATE)  # 6, as NVIDIA's server computes it
