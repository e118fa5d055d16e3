"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's Inception-V3 with random (He-initialised, so features have scale) weights, saved as a
    state dict: the pretrained file cannot be downloaded here, and the code path is the same."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("random", ["2048", "logits_unbiased"])
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def _save_tiny_tokenizer(directory: Path, latent_channels: int) -> Path:
    """A random AlignTok tokenizer (stride 16: a one-block, 32-wide ViT with 16 px patches and a 4-channel
    five-level decoder; 4x4 latents at 64 px) saved like a trained one. Seeded: the same weights every call."""
    from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

    cfg = TokenizerConfig(encoder="random", latent_channels=latent_channels, adapter_hidden=16)
    cfg.random_encoder.hidden_size, cfg.random_encoder.patch_size, cfg.random_encoder.num_layers = 32, 16, 1
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 4, [1, 1, 1, 1, 1], 4
    cfg.decoder.layers_per_block = 1
    torch.manual_seed(0)
    AlignTokTokenizer.from_config(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """``tiny_tokenizer(directory, latent_channels)`` saves a tiny random tokenizer there (a pure function)."""
    return _save_tiny_tokenizer
