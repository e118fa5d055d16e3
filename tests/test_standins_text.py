"""The stand-in T5 text encoder: trained once on built-in captions, cached, loaded like a hub T5."""

from __future__ import annotations

import torch

from aligntok import standins
from aligntok.models.text import TextConditioner, TextConfig
from aligntok.standins.text import StandinTextSettings, ensure_standin_text_encoder


def test_standin_text_encoder_is_cached_and_loads_like_t5(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNTOK_CACHE", str(tmp_path))
    settings = StandinTextSettings(steps=40, data_size=40, batch_size=16, d_model=32)
    runs = standins.TRAINING_RUNS["text"]
    path = ensure_standin_text_encoder(settings, progress=False)
    assert ensure_standin_text_encoder(settings, progress=False) == path
    assert standins.TRAINING_RUNS["text"] == runs + 1  # trained once, then read from the cache
    info = standins.read_standin_info(path)
    assert info["final_loss"] < info["first_loss"]
    cond = TextConditioner(TextConfig(encoder=str(path)))
    tokens, mask, _ = cond(["a red circle left of a blue square on a plain gray background",
                                 "a blue circle left of a red square on a plain gray background"])
    assert tokens.shape[2] == 32 and mask.all()
    assert not torch.allclose(tokens[0], tokens[1])  # colour order matters token by token
    assert 2 not in cond.tokenizer("a red circle left of a blue square")["input_ids"]  # no <unk>: words known
