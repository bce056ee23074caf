"""LoRA / QLoRA: apply, train, fuse, save / load adapters (tiny modules, plus a real talker)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    QLoRALinear,
    apply_lora,
    fuse_lora,
    load_adapters,
    lora_state,
    read_adapter_config,
    remove_lora,
    save_adapters,
    trainable_parameters,
)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

HIDDEN = 64
ATTN_QV = r"model\.layers\.\d+\.self_attn\.(q|v)_proj"
ALL_PROJ = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=True)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weights = mx.softmax(q @ k.swapaxes(-1, -2) / HIDDEN**0.5, axis=-1)
        return self.o_proj(weights @ v)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.down_proj = nn.Linear(2 * HIDDEN, HIDDEN, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(HIDDEN)
        self.self_attn = Attention()
        self.mlp = MLP()

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.norm(x))
        return x + self.mlp(x)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, HIDDEN)
        self.layers = [Layer(), Layer()]


class Talker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()


class Tiny(nn.Module):
    """Paths like `talker.model.layers.0.self_attn.q_proj`, and a Linear outside the talker."""

    def __init__(self) -> None:
        super().__init__()
        self.talker = Talker()
        self.head = nn.Linear(HIDDEN, 16)

    def __call__(self, tokens: mx.array) -> mx.array:
        x = self.talker.model.embed(tokens)
        for layer in self.talker.model.layers:
            x = layer(x)
        return self.head(x)


def make_tiny(seed: int = 0) -> Tiny:
    mx.random.seed(seed)
    model = Tiny()
    mx.eval(model.parameters())
    return model


def tokens() -> mx.array:
    return mx.array([[1, 5, 7, 3, 9, 2], [4, 4, 8, 0, 31, 6]])


def talker_config(**overrides) -> LoRAConfig:
    return LoRAConfig(**{"targets": [ATTN_QV], "rank": 4, "scope": "talker", **overrides})


def randomise_lora_b(model: nn.Module, seed: int = 7) -> None:
    """Give every adapter a non-zero B so that it changes the output."""
    mx.random.seed(seed)
    updates = [
        (name, 0.1 * mx.random.normal(value.shape))
        for name, value in lora_state(model).items()
        if name.endswith(".lora_b")
    ]
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


# ---------------------------------------------------------------- apply


def test_apply_wraps_only_matching_linears_under_scope() -> None:
    model = make_tiny()
    head = model.head
    paths = apply_lora(model, talker_config())

    assert paths == [
        f"talker.model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")
    ]
    layers = model.talker.model.layers
    assert all(isinstance(layer.self_attn.q_proj, LoRALinear) for layer in layers)
    assert all(isinstance(layer.self_attn.k_proj, nn.Linear) for layer in layers)
    assert model.head is head
    wrapped = layers[0].self_attn.q_proj
    assert wrapped.lora_a.shape == (HIDDEN, 4)
    assert wrapped.lora_b.shape == (4, HIDDEN)
    assert wrapped.scale == pytest.approx(16.0 / 4)
    assert not mx.any(wrapped.lora_b).item()
    # the scope is a prefix: the same pattern without it matches nothing in Tiny
    with pytest.raises(LoRAError, match="matches any of the targets"):
        apply_lora(make_tiny(), talker_config(scope=""))


def test_fresh_adapter_is_a_noop() -> None:
    model = make_tiny()
    before = model(tokens())
    apply_lora(model, talker_config(targets=[ALL_PROJ]))
    np.testing.assert_array_equal(np.array(model(tokens())), np.array(before))


def test_only_lora_tensors_are_trainable() -> None:
    model = make_tiny()
    paths = apply_lora(model, talker_config())
    expected = {f"{p}.{n}" for p in paths for n in ("lora_a", "lora_b")}
    assert set(trainable_parameters(model)) == expected
    assert set(lora_state(model)) == expected


def test_gradients_reach_lora_b_and_one_step_changes_it() -> None:
    model = make_tiny()
    apply_lora(model, talker_config())
    layer = model.talker.model.layers[0].self_attn.q_proj
    base_before = np.array(layer.linear.weight)
    mx.random.seed(3)
    target = mx.random.normal((2, 6, 16))

    def loss_fn(m: Tiny, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.mse_loss(m(x), y)

    loss, grads = nn.value_and_grad(model, loss_fn)(model, tokens(), target)
    flat = dict(tree_flatten(grads))
    assert set(flat) == set(lora_state(model))
    assert float(mx.abs(flat["talker.model.layers.0.self_attn.q_proj.lora_b"]).max()) > 0

    optimizer = optim.SGD(learning_rate=0.5)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    assert mx.any(layer.lora_b).item()
    np.testing.assert_array_equal(np.array(layer.linear.weight), base_before)
    assert float(loss_fn(model, tokens(), target)) < float(loss)


def test_apply_rejects_bad_matches() -> None:
    with pytest.raises(LoRAError, match=r"no_such_layer"):
        apply_lora(make_tiny(), talker_config(targets=[r"no_such_layer", r"nor\.this"]))
    with pytest.raises(LoRAError, match=r"not Linear.*self_attn \(Attention\)"):
        apply_lora(make_tiny(), talker_config(targets=[r"model\.layers\.0\.self_attn"]))
    with pytest.raises(LoRAError, match="scope"):
        apply_lora(make_tiny(), talker_config(scope="speaker"))
    model = make_tiny()
    apply_lora(model, talker_config())
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model, talker_config())


def test_config_round_trip_and_validation() -> None:
    config = LoRAConfig(targets=[ATTN_QV], rank=2, alpha=4, dropout=0.1, scope="talker")
    data = config.to_dict()
    assert data == {
        "targets": [ATTN_QV],
        "rank": 2,
        "alpha": 4.0,
        "dropout": 0.1,
        "scope": "talker",
    }
    assert LoRAConfig.from_dict(json.loads(json.dumps(data))) == config
    with pytest.raises(LoRAError, match="rank"):
        LoRAConfig(targets=[ATTN_QV], rank=0)
    with pytest.raises(LoRAError, match="regular expression"):
        LoRAConfig(targets=["(unclosed"])
    with pytest.raises(LoRAError, match="unknown LoRA config keys: bogus"):
        LoRAConfig.from_dict({**data, "bogus": 1})


def test_remove_lora_puts_the_base_layers_back() -> None:
    model = make_tiny()
    original = model.talker.model.layers[1].self_attn.v_proj
    before = model(tokens())
    paths = apply_lora(model, talker_config())
    randomise_lora_b(model)
    assert max_diff(model(tokens()), before) > 1e-3
    assert remove_lora(model) == paths
    assert model.talker.model.layers[1].self_attn.v_proj is original
    assert lora_state(model) == {}
    np.testing.assert_array_equal(np.array(model(tokens())), np.array(before))


# ---------------------------------------------------------------- fuse


def test_fuse_lora_matches_unfused_output() -> None:
    model = make_tiny()
    paths = apply_lora(model, talker_config(targets=[ALL_PROJ]))
    randomise_lora_b(model)
    unfused = model(tokens())
    assert max_diff(unfused, make_tiny()(tokens())) > 1e-3  # the adapters do something

    assert fuse_lora(model) == paths
    assert lora_state(model) == {}
    q_proj = model.talker.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear
    assert "bias" in q_proj
    assert "bias" not in model.talker.model.layers[0].self_attn.k_proj
    assert max_diff(model(tokens()), unfused) < 1e-4


def test_qlora_fuse_matches_unfused_output() -> None:
    model = make_tiny()
    nn.quantize(
        model.talker,
        group_size=32,
        bits=4,
        class_predicate=lambda _, m: isinstance(m, nn.Linear),
    )
    quantized = model.talker.model.layers[0].self_attn.q_proj
    assert isinstance(quantized, nn.QuantizedLinear)
    before = model(tokens())

    paths = apply_lora(model, talker_config(targets=[ALL_PROJ]))
    assert len(paths) == 14
    wrapped = model.talker.model.layers[0].mlp.down_proj
    assert isinstance(wrapped, QLoRALinear)
    assert wrapped.lora_a.shape == (2 * HIDDEN, 4)
    assert wrapped.lora_b.shape == (4, HIDDEN)
    np.testing.assert_array_equal(np.array(model(tokens())), np.array(before))

    randomise_lora_b(model)
    unfused = model(tokens())
    assert max_diff(unfused, before) > 1e-3
    fuse_lora(model)
    fused = model.talker.model.layers[0].self_attn.q_proj
    assert type(fused) is nn.Linear
    assert fused.weight.dtype == mx.float32
    assert "bias" in fused
    assert max_diff(model(tokens()), unfused) < 1e-4


def test_single_layer_fuse_formula() -> None:
    mx.random.seed(1)
    base = nn.Linear(HIDDEN, 32, bias=True)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    layer.lora_b = mx.random.normal((4, 32))
    fused = layer.fuse()
    expected = base.weight + 2.0 * (layer.lora_a @ layer.lora_b).T
    assert max_diff(fused.weight, expected) < 1e-6
    np.testing.assert_array_equal(np.array(fused.bias), np.array(base.bias))
    x = mx.random.normal((3, HIDDEN))
    assert max_diff(fused(x), layer(x)) < 1e-4


def test_lora_branch_follows_input_dtype() -> None:
    base = nn.Linear(HIDDEN, 32)
    base.set_dtype(mx.bfloat16)
    layer = LoRALinear(base, rank=4)
    layer.lora_b = mx.ones((4, 32))
    assert layer(mx.ones((2, HIDDEN), dtype=mx.bfloat16)).dtype == mx.bfloat16


# ---------------------------------------------------------------- save / load

METADATA = {"family": "tiny", "base_model": "tiny-seed-0", "strategy": "lora"}


def trained_adapter(tmp_path: Path, **metadata) -> tuple[Path, mx.array]:
    model = make_tiny()
    config = talker_config(targets=[ALL_PROJ])
    apply_lora(model, config)
    randomise_lora_b(model)
    out = save_adapters(tmp_path / "adapter", model, config, {**METADATA, **metadata})
    return out, model(tokens())


def test_save_load_round_trip(tmp_path: Path) -> None:
    out, expected = trained_adapter(tmp_path)
    saved = mx.load(str(out / ADAPTER_WEIGHTS))
    assert len(saved) == 2 * 14
    assert all(name.endswith((".lora_a", ".lora_b")) for name in saved)
    on_disk = json.loads((out / ADAPTER_CONFIG).read_text())
    assert on_disk == {"lora": talker_config(targets=[ALL_PROJ]).to_dict(), **METADATA}
    assert read_adapter_config(out) == on_disk

    fresh = make_tiny()
    assert load_adapters(fresh, out) == on_disk
    assert set(trainable_parameters(fresh)) == set(saved)
    np.testing.assert_array_equal(np.array(fresh(tokens())), np.array(expected))


def test_save_includes_trained_tensors(tmp_path: Path) -> None:
    model = make_tiny()
    config = talker_config()
    apply_lora(model, config)
    randomise_lora_b(model)
    model.talker.model.embed.weight = model.talker.model.embed.weight + 1.0
    expected = model(tokens())
    metadata = {**METADATA, "trained_tensors": ["talker.model.embed.weight"]}
    out = save_adapters(tmp_path / "adapter", model, config, metadata)

    saved = mx.load(str(out / ADAPTER_WEIGHTS))
    assert set(saved) == set(lora_state(model)) | {"talker.model.embed.weight"}
    fresh = make_tiny()
    load_adapters(fresh, out)
    np.testing.assert_array_equal(np.array(fresh(tokens())), np.array(expected))

    with pytest.raises(LoRAError, match=r"talker\.model\.nope"):
        save_adapters(tmp_path / "bad", model, config, {"trained_tensors": ["talker.model.nope"]})


def test_load_reports_every_problem_at_once(tmp_path: Path) -> None:
    out, _ = trained_adapter(tmp_path)
    weights = dict(mx.load(str(out / ADAPTER_WEIGHTS)))
    missing = "talker.model.layers.1.mlp.up_proj.lora_a"
    misshaped = "talker.model.layers.0.self_attn.k_proj.lora_b"
    unknown = "talker.model.layers.0.self_attn.q_proj.lora_c"
    integer = "talker.model.layers.1.self_attn.o_proj.lora_a"
    del weights[missing]
    weights[misshaped] = mx.zeros((3, HIDDEN))
    weights[unknown] = mx.zeros((4, 4))
    weights[integer] = weights[integer].astype(mx.int32)
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), weights)

    model = make_tiny()
    with pytest.raises(AdapterError) as caught:
        load_adapters(model, out)
    message = str(caught.value)
    assert "4 problems" in message
    assert (
        f"1 unknown tensor(s) (not LoRA tensors of this model nor trained_tensors): {unknown}"
        in message
    )
    assert f"1 missing tensor(s): {missing}" in message
    assert f"1 tensor(s) with the wrong shape: {misshaped} (file (3, 64), model (4, 64))" in message
    assert f"1 tensor(s) with a non-float dtype: {integer}" in message
    assert len(caught.value.problems) == 4
    # the LoRA layers this call applied are taken out again
    assert lora_state(model) == {}


def test_load_rejects_a_scale_mismatch(tmp_path: Path) -> None:
    out, _ = trained_adapter(tmp_path)
    model = make_tiny()
    apply_lora(model, talker_config(targets=[ALL_PROJ], alpha=4.0))
    with pytest.raises(AdapterError, match="14 LoRA layer"):
        load_adapters(model, out)


def test_load_rejects_damaged_files(tmp_path: Path) -> None:
    out, _ = trained_adapter(tmp_path)
    weights_file, config_file = out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG
    good_config, good_weights = config_file.read_text(), weights_file.read_bytes()

    config_file.write_text(good_config[: len(good_config) // 2])
    with pytest.raises(AdapterError, match=f"{ADAPTER_CONFIG}: not valid JSON"):
        load_adapters(make_tiny(), out)
    config_file.write_text(json.dumps({**METADATA, "lora": {"rank": 4}}))
    with pytest.raises(AdapterError, match="no 'targets'"):
        load_adapters(make_tiny(), out)
    config_file.write_text(good_config)

    weights_file.write_bytes(good_weights[: len(good_weights) // 2])
    model = make_tiny()
    with pytest.raises(AdapterError, match=f"{ADAPTER_WEIGHTS}: cannot be read"):
        load_adapters(model, out)
    assert lora_state(model) == {}
    weights_file.unlink()
    with pytest.raises(AdapterError, match=f"{ADAPTER_WEIGHTS}: file is missing"):
        load_adapters(make_tiny(), out)
    with pytest.raises(AdapterError, match=f"{ADAPTER_CONFIG}: file is missing"):
        load_adapters(make_tiny(), tmp_path / "nowhere")


def test_load_rejects_targets_that_do_not_fit(tmp_path: Path) -> None:
    model = make_tiny()
    config = LoRAConfig(targets=["head"], rank=2)
    apply_lora(model, config)
    out = save_adapters(tmp_path / "adapter", model, config, METADATA)

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(AdapterError, match="does not fit the model"):
        load_adapters(Other(), out)


def test_save_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = trained_adapter(tmp_path, strategy="first")
    (out / "stale.txt").write_text("left over from an older adapter")
    out, expected = trained_adapter(tmp_path, strategy="second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert read_adapter_config(out)["strategy"] == "second"

    def crash(*args, **kwargs) -> None:
        raise OSError("disk full")

    model = make_tiny(seed=5)
    config = talker_config()
    apply_lora(model, config)
    monkeypatch.setattr(mx, "save_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(out, model, config, {**METADATA, "strategy": "third"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert read_adapter_config(out)["strategy"] == "second"
    fresh = make_tiny()
    load_adapters(fresh, out)
    np.testing.assert_array_equal(np.array(fresh(tokens())), np.array(expected))


def test_save_refuses_a_model_without_lora(tmp_path: Path) -> None:
    with pytest.raises(LoRAError, match="no LoRA layers"):
        save_adapters(tmp_path / "adapter", make_tiny(), talker_config(), METADATA)
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------- a real Qwen3-TTS talker


def make_qwen3_talker():
    from mlx_audio.tts.models.qwen3_tts.config import Qwen3TTSTalkerConfig
    from mlx_audio.tts.models.qwen3_tts.talker import Qwen3TTSTalkerForConditionalGeneration

    config = Qwen3TTSTalkerConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_scaling={"interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
        text_hidden_size=32,
        text_vocab_size=1000,
        num_code_groups=4,
        code_predictor_config={
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_code_groups": 4,
        },
    )
    mx.random.seed(0)
    model = Qwen3TTSTalkerForConditionalGeneration(config)
    mx.eval(model.parameters())
    return model


def test_qwen3_talker_targets(tmp_path: Path) -> None:
    model = make_qwen3_talker()
    mx.random.seed(1)
    embeds = mx.random.normal((1, 5, 64))
    base_logits, _ = model(embeds)

    config = LoRAConfig(targets=[ALL_PROJ], rank=4)
    paths = apply_lora(model, config)
    assert len(paths) == 2 * 7
    assert all(p.startswith("model.layers.") for p in paths)
    predictor = model.code_predictor.model.layers[0]
    assert type(predictor.self_attn.q_proj) is nn.Linear
    assert type(predictor.mlp.down_proj) is nn.Linear
    assert set(trainable_parameters(model)) == set(lora_state(model))
    logits, _ = model(embeds)
    np.testing.assert_array_equal(np.array(logits), np.array(base_logits))

    randomise_lora_b(model)
    trained_logits, _ = model(embeds)
    assert max_diff(trained_logits, base_logits) > 1e-3
    out = save_adapters(tmp_path / "voice", model, config, {"family": "qwen3_tts"})
    fresh = make_qwen3_talker()
    load_adapters(fresh, out)
    logits, _ = fresh(embeds)
    np.testing.assert_array_equal(np.array(logits), np.array(trained_logits))

    both = LoRAConfig(targets=[ALL_PROJ, r"code_predictor\." + ALL_PROJ], rank=4)
    assert len(apply_lora(make_qwen3_talker(), both)) == 2 * 7 + 7
