"""The trainer's sequence layout is the one mlx-audio builds at inference."""

from __future__ import annotations

from finetune.families.qwen3_tts.conditioning import Conditioning, SpecialIds, VoiceConditioning
from finetune.families.qwen3_tts.forward import input_embeddings, qwen3_tts_loss
from finetune.families.qwen3_tts.layout import IGNORE, build_sequence, chat_text, pack
from finetune.families.qwen3_tts.serving import Qwen3Prompter

import mlx.core as mx
import numpy as np
import pytest

REF = mx.array((0.3 * np.sin(np.linspace(0, 3000, 36_000))).astype(np.float32))


@pytest.mark.parametrize(
    ("text", "language", "with_speaker"),
    [
        ("Hello world, how are you?", "auto", True),
        ("Hi.", "english", False),
        ("नमस्ते दुनिया", "auto", False),
        ("Bonjour à tous.", "french", True),
    ],
)
def test_prefix_equals_mlx_audio_inference_prefix(loaded_qwen3_base, text, language, with_speaker):
    model = loaded_qwen3_base.model
    ids = SpecialIds.from_config(model.config)
    seq = build_sequence(
        ids,
        model.tokenizer.encode(chat_text(text)),
        np.zeros((0, 16), np.int32),
        Conditioning(language=language, speaker=with_speaker),
    )
    spk = model.extract_speaker_embedding(REF) if with_speaker else None
    ours = input_embeddings(model.talker, pack([seq], ids), spk)
    theirs, _, _ = model._prepare_generation_inputs(
        text, language=language, ref_audio=REF if with_speaker else None
    )
    assert ours.shape == theirs.shape
    assert mx.abs(ours - theirs).max().item() < 1e-6


def test_labels_are_shifted_once_and_end_with_codec_eos(loaded_qwen3_base):
    model = loaded_qwen3_base.model
    ids = SpecialIds.from_config(model.config)
    codes = np.arange(5 * 16, dtype=np.int32).reshape(5, 16) % 2048
    seq = build_sequence(
        ids,
        model.tokenizer.encode(chat_text("Hi there.")),
        codes,
        Conditioning(language=None, speaker=False),
    )
    batch = pack([seq], ids)
    p = seq.prefix_len
    labels = batch.labels[0]
    assert list(labels[p - 1 : p + 4]) == list(codes[:, 0])
    assert labels[p + 4] == ids.codec_eos
    assert (labels[: p - 1] == IGNORE).all() and (labels[p + 5 :] == IGNORE).all()
    # The frame at position p+j is fed codes of frame j and is summed with tts_pad.
    assert batch.frame_mask[0, p : p + 5].all() and not batch.frame_mask[0, p - 1]
    assert list(batch.sub_positions) == [p - 1 + j for j in range(5)]


def test_teacher_forcing_matches_the_kv_cache_inference_loop(loaded_qwen3_base):
    """Feeding frames one at a time through mlx-audio's cache gives the training logits."""
    model = loaded_qwen3_base.model
    ids = SpecialIds.from_config(model.config)
    codes = np.random.default_rng(1).integers(0, 2048, (4, 16)).astype(np.int32)
    text = "Teacher forcing."
    seq = build_sequence(
        ids,
        model.tokenizer.encode(chat_text(text)),
        codes,
        Conditioning(language=None, speaker=False),
    )
    batch = pack([seq], ids)
    logits, _ = model.talker(input_embeddings(model.talker, batch, None))

    prefix, _, tts_pad = model._prepare_generation_inputs(text)
    cache = model.talker.make_cache()
    step_logits, _ = model.talker(prefix, cache=cache)
    incremental = [step_logits[:, -1]]
    for frame in codes[:-1]:
        embed = model.talker.get_input_embeddings()(mx.array(frame[:1])[None])
        for i, table in enumerate(model.talker.code_predictor.codec_embedding):
            embed = embed + table(mx.array(frame[i + 1 : i + 2])[None])
        step_logits, _ = model.talker(tts_pad + embed, cache=cache)
        incremental.append(step_logits[:, -1])
    p = seq.prefix_len
    forced = logits[0, p - 1 : p - 1 + len(codes)]
    assert mx.abs(forced - mx.concatenate(incremental, axis=0)).max().item() < 1e-4


def test_loss_parts_are_finite_and_weighted(loaded_qwen3_base):
    model = loaded_qwen3_base.model
    ids = SpecialIds.from_config(model.config)
    codes = np.random.default_rng(2).integers(0, 2048, (6, 16)).astype(np.int32)
    seqs = [
        build_sequence(
            ids,
            model.tokenizer.encode(chat_text(t)),
            codes[:n],
            Conditioning(language=None, speaker=True),
        )
        for t, n in (("One.", 6), ("A longer second sentence.", 3))
    ]
    spk = mx.concatenate([model.extract_speaker_embedding(REF)] * 2)
    parts = qwen3_tts_loss(model.talker, pack(seqs, ids), spk, sub_weight=0.3)
    total, main, sub = parts.total.item(), parts.main.item(), parts.sub.item()
    assert np.isfinite([total, main, sub]).all()
    assert total == pytest.approx(main + 0.3 * sub, rel=1e-5)
    with pytest.raises(ValueError, match="speaker"):
        qwen3_tts_loss(model.talker, pack(seqs, ids), None)


@pytest.mark.parametrize(
    ("speaker", "language"),
    [
        ("dylan", "auto"),
        ("dylan", "chinese"),
        ("eric", None),
        ("dylan", "english"),
        ("vivian", None),
    ],
)
def test_served_named_speaker_prefix_equals_mlx_audio_including_dialects(
    tiny_qwen3_custom, speaker, language
):
    """Dialect speakers speak with their dialect's language id in auto / Chinese mode."""
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    model = load_qwen3_tts(tiny_qwen3_custom).model
    prompter = Qwen3Prompter(model)
    cond = VoiceConditioning(speaker="baked").utterance(language, speaker)
    ours = prompter.prompt("Ni hao.", cond, prompter.speaker_vector(speaker))
    theirs, _, _ = model._prepare_generation_inputs(
        "Ni hao.", language=language or "auto", speaker=speaker
    )
    assert ours.shape == theirs.shape[1:]
    assert mx.abs(ours - theirs[0]).max().item() < 1e-6


def test_a_new_language_row_is_laid_out_like_a_builtin_language(loaded_qwen3_base):
    from finetune.families.qwen3_tts.languages import free_rows, install_language_row

    model = loaded_qwen3_base.model
    talker = model.config.talker_config
    saved = dict(talker.codec_language_id)
    (row,) = free_rows(talker, 1)
    assert row not in saved.values() and row not in (talker.spk_id or {}).values()
    vector = np.linspace(-1, 1, model.talker.model.codec_embedding.weight.shape[1])
    previous = install_language_row(model, "hindi", row, vector.astype(np.float32))
    try:
        ids = SpecialIds.from_config(model.config)
        seq = build_sequence(
            ids,
            model.tokenizer.encode(chat_text("Namaste.")),
            np.zeros((0, 16), np.int32),
            Conditioning(language="Hindi", speaker=False),
        )
        assert row in seq.codec_ids.tolist()
        ours = input_embeddings(model.talker, pack([seq], ids), None)
        theirs, _, _ = model._prepare_generation_inputs("Namaste.", language="hindi")
        assert mx.abs(ours - theirs).max().item() < 1e-6
    finally:
        from finetune.families.qwen3_tts.languages import remove_language_row

        remove_language_row(model, "hindi", row, previous)
    assert talker.codec_language_id == saved
