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
