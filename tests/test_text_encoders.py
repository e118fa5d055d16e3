"""Text encoders: tiny random T5 / CLIP with a local word-level tokenizer, loaded like hub models."""

from __future__ import annotations

import pytest
import torch

from aligntok.config import ConfigError
from aligntok.models.text import (
    TextConditioner,
    TextConfig,
    build_tiny_text_encoders,
)
from aligntok.models.word_tokenizer import word_level_tokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "left", "of", "right", "above", "below", "on", "the", "background", "two", "three"]


@pytest.fixture
def encoders(tmp_path):
    return build_tiny_text_encoders(tmp_path, WORDS, width=16, layers=1, heads=2)


def test_word_level_tokenizer_uses_t5_special_ids():
    tok = word_level_tokenizer(WORDS)
    ids = tok(["a red circle", ""], padding="longest")["input_ids"]
    assert ids[0][-1] == 1 and ids[1] == [1, 0, 0, 0]  # </s> appended; "" is just </s>, padded with 0
    assert tok("a purple circle")["input_ids"][1] == 2  # unknown word


def test_t5_sequence_and_clip_pooled_shapes_and_mask(encoders):
    cond = TextConditioner(TextConfig(encoder=str(encoders["t5"]), pooled=str(encoders["clip"]), max_length=8))
    tokens, mask, pooled = cond(["a red circle left of a blue square", ""])
    assert tokens.shape == (2, 8, 16) and pooled.shape == (2, 16)
    assert mask[0].all() and mask[1].tolist() == [True] + [False] * 7
    assert cond.text_dim == 16 and cond.pooled_dim == 16
    assert not any(p.requires_grad for p in cond.parameters())


def test_truncation_is_counted_and_pooled_sources(encoders):
    cond = TextConditioner(TextConfig(encoder=str(encoders["t5"]), max_length=4))
    tokens, mask, pooled = cond(["a red circle left of a blue square", "a circle"])
    assert tokens.shape[1] == 4 and cond.truncated == 1
    weights = mask.float()[..., None]
    assert torch.allclose(pooled, (tokens * weights).sum(1) / weights.sum(1))
    zeros = TextConditioner(TextConfig(encoder=str(encoders["t5"]), pooled="zeros"))
    assert not zeros(["a circle"])[2].any()


def test_padding_does_not_change_a_captions_states(encoders):
    cond = TextConditioner(TextConfig(encoder=str(encoders["t5"])))
    alone = cond(["a red circle"])[0]
    batched, _, _ = cond(["a red circle", "a red circle left of a blue square on the background"])
    assert torch.allclose(batched[0, : alone.shape[1]], alone[0], atol=1e-5)


def test_wrong_model_class_is_a_one_line_error(encoders, tmp_path):
    with pytest.raises(ValueError, match="is a 'clip_text_model' model; expected one of t5"):
        TextConditioner(TextConfig(encoder=str(encoders["clip"])))
    with pytest.raises(ValueError, match="expected one of clip"):
        TextConditioner(TextConfig(encoder=str(encoders["t5"]), pooled=str(encoders["t5"])))
    with pytest.raises(ValueError, match="not a local model directory"):
        TextConditioner(TextConfig(encoder=str(tmp_path / "missing")))
    with pytest.raises(ConfigError):
        TextConfig(max_length=1).validate()


def test_automodel_pitfall_is_avoided(encoders):
    """AutoModel on a T5 encoder directory builds a full T5Model (random decoder); the conditioner does not."""
    from transformers import AutoModel, T5EncoderModel

    assert type(AutoModel.from_pretrained(str(encoders["t5"]))).__name__ == "T5Model"
    cond = TextConditioner(TextConfig(encoder=str(encoders["t5"])))
    assert type(cond.encoder) is T5EncoderModel
