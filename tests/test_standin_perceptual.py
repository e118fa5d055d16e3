"""The LPIPS stand-in on the built-in evaluation CNN: ``builtin_perceptual_distance``.

A tiny randomly initialised evaluation network (never trained here), saved in the directory format
``load_eval_network`` reads, with random BatchNorm statistics so that eval-mode BatchNorm matters in
the hand computation below.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from aligntok import standins
from aligntok.eval import open_images, save_npz
from aligntok.standins import (
    BuiltinEvalNetwork,
    builtin_perceptual_distance,
    load_eval_network,
)
from aligntok.standins.evalnet import build_eval_backbone
from aligntok.standins.recipe import HEAD_LAYOUT, HEAD_WIDTH

RESOLUTION = 32
WIDTHS = (8, 16, 16)


@pytest.fixture(scope="module")
def network_dir(tmp_path_factory) -> Path:
    """The network's files, written once per module (a directory is what the tests share, never a module)."""
    torch.manual_seed(0)
    backbone = build_eval_backbone(WIDTHS, stem_stride=2)
    heads = nn.Linear(WIDTHS[-1], HEAD_WIDTH)
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.2)
    directory = tmp_path_factory.mktemp("eval-network")
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / standins.EVAL_WEIGHTS_FILE))
    config = {"architecture": "aligntok.standins eval CNN", "widths": list(WIDTHS), "stem_stride": 2,
              "resolution": RESOLUTION, "head_layout": HEAD_LAYOUT, "class_names": []}
    (directory / standins.EVAL_CONFIG_FILE).write_text(json.dumps(config))
    return directory


@pytest.fixture
def network(network_dir) -> BuiltinEvalNetwork:
    return load_eval_network(network_dir)


def _images(count: int, seed: int, size: int = RESOLUTION) -> torch.Tensor:
    """Smooth random uint8 (count, 3, size, size) images: upsampled noise, so the CNN sees structure."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 4, size // 4, generator=generator)
    return (F.interpolate(coarse, size=size, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def _noisy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def _hand_distance(network: BuiltinEvalNetwork, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The distance written out on the backbone's children (images already at the network's resolution)."""
    # conv, bn, relu, BasicBlock..., pool, flatten; a float64 copy so rounding cannot hide a mistake
    children = list(copy.deepcopy(network.module).double().eval().children())
    assert isinstance(children[2], nn.ReLU) and isinstance(children[-2], nn.AdaptiveAvgPool2d)

    def maps(images: torch.Tensor) -> list[torch.Tensor]:
        x = (images.double() / 255.0 - 0.5) / 0.5  # the network's [0, 1] -> mean/std 0.5 normalisation
        x = torch.relu(children[1](children[0](x)))
        out = [x]
        for block in children[3:-2]:
            x = block(x)
            out.append(x)
        return out

    total = torch.zeros(a.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for fa, fb in zip(maps(a), maps(b), strict=True):
            na = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            per_position = ((na - nb) ** 2).sum(dim=1) / fa.shape[1]  # uniform channel weights 1/C
            total += per_position.flatten(1).mean(dim=1)
    return total


def test_stage_features_are_the_stem_and_every_block_before_pooling(network):
    maps = network.stage_features(_images(2, 0))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)]
    with pytest.raises(ValueError, match="uint8"):
        network.stage_features(_images(2, 0).float())


def test_identical_images_are_exactly_zero_and_the_distance_is_symmetric(network):
    a, b = _images(6, 1), _images(6, 2)
    assert torch.equal(builtin_perceptual_distance(a, a.clone(), network=network), torch.zeros(6))
    forward = builtin_perceptual_distance(a, b, network=network)
    assert forward.shape == (6,) and forward.dtype == torch.float32 and (forward > 0).all()
    assert torch.equal(forward, builtin_perceptual_distance(b, a, network=network))


def test_larger_noise_gives_a_larger_distance(network):
    clean = _images(8, 3)
    levels = [builtin_perceptual_distance(clean, _noisy(clean, sigma, seed=4), network=network)
              for sigma in (2.0, 8.0, 24.0, 64.0)]
    means = [level.mean().item() for level in levels]
    assert all(lower < higher for lower, higher in itertools.pairwise(means)), means
    assert (levels[-1] > levels[0]).all()


def test_matches_a_hand_computation(network):
    a, b = _images(1, 5), _noisy(_images(1, 5), 20.0, seed=6)
    expected = _hand_distance(network, a, b)
    actual = builtin_perceptual_distance(a, b, network=network)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-7)
    assert expected.item() > 1e-3  # a real difference, not a trivially matching zero


def test_batch_size_and_input_format_do_not_change_the_result(network, tmp_path):
    a, b = _images(7, 7), _images(7, 8)
    reference = builtin_perceptual_distance(a, b, network=network, batch_size=64)
    for batch_size in (1, 3):
        torch.testing.assert_close(builtin_perceptual_distance(a, b, network=network, batch_size=batch_size),
                                   reference, rtol=1e-5, atol=1e-7)
    # Float [-1, 1] tensors, uint8 NHWC arrays and .npz files are the same images.
    as_float = builtin_perceptual_distance(a.float() / 127.5 - 1, b.float() / 127.5 - 1, network=network)
    nhwc_a, nhwc_b = a.permute(0, 2, 3, 1).numpy(), b.permute(0, 2, 3, 1).numpy()
    as_array = builtin_perceptual_distance(nhwc_a, nhwc_b, network=network)
    save_npz(nhwc_a, tmp_path / "a.npz")
    save_npz(nhwc_b, tmp_path / "b.npz")
    as_files = builtin_perceptual_distance(open_images(tmp_path / "a.npz"), open_images(tmp_path / "b.npz"),
                                           network=network, batch_size=4)
    for other in (as_float, as_array, as_files):
        torch.testing.assert_close(other, reference, rtol=1e-5, atol=1e-7)
    # Images larger than the network's resolution are resized inside it, like builtin_fd's inputs.
    big = builtin_perceptual_distance(_images(2, 9, 64), _images(2, 10, 64), network=network)
    assert big.shape == (2,) and torch.isfinite(big).all()
    assert builtin_perceptual_distance(a[:0], b[:0], network=network).shape == (0,)


def test_bad_inputs_are_one_line_value_errors(network):
    a = _images(4, 11)
    with pytest.raises(ValueError, match="4 originals but 3 reconstructions"):
        builtin_perceptual_distance(a, a[:3], network=network)
    with pytest.raises(ValueError, match="same size"):
        builtin_perceptual_distance(a, _images(4, 11, 48), network=network)
    with pytest.raises(ValueError, match="uint8 \\(N, H, W, 3\\)"):
        builtin_perceptual_distance(a.permute(0, 2, 3, 1).numpy().astype(np.float32), a, network=network)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        builtin_perceptual_distance(a[:, :1], a[:, :1], network=network)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        builtin_perceptual_distance(a, a, network=network, batch_size=0)

