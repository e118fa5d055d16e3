"""The perceptual distance on builtin:shapes: plays LPIPS's role, whose VGG/AlexNet trunks cannot be downloaded.

LPIPS's formula on the evaluation CNN's stage feature maps with uniform channel weights instead of
LPIPS's learned linear heads; its numbers are *not* comparable to published LPIPS values.
"""

from __future__ import annotations

import torch

from aligntok.eval.features import ImageInput, uint8_batches
from aligntok.standins.evalnet import BuiltinEvalNetwork, resolve_network

#: LPIPS's ``normalize_tensor`` epsilon, added to each feature vector's norm (keeps all-zero vectors finite).
LPIPS_EPS = 1e-10


def _unit_normalise(features: torch.Tensor) -> torch.Tensor:
    """Each spatial position's feature vector divided by its channel norm (+ eps), as lpips does."""
    import lpips

    return lpips.normalize_tensor(features, eps=LPIPS_EPS)


@torch.inference_mode()
def builtin_perceptual_distance(
    originals: ImageInput, reconstructions: ImageInput, *, network: BuiltinEvalNetwork | None = None,
    batch_size: int = 250, device: str | torch.device | None = None,
) -> torch.Tensor:
    """Per-image perceptual distance (float32 CPU tensor, shape (N,)) between paired image sets.

    LPIPS's distance (Zhang et al., 2018) with *uniform weights*, computed on the built-in evaluation
    CNN: for each stage feature map of :meth:`BuiltinEvalNetwork.stage_features` (the stem's ReLU
    output and every BasicBlock's output, before pooling), unit-normalise each spatial position's
    feature vector over channels (LPIPS's eps), take the squared difference, average it over channels
    (LPIPS learns per-channel weights here; this uses 1/C) and spatial positions, and sum over stages.
    It is the offline stand-in for LPIPS on ``builtin:shapes``, where VGG/AlexNet weights cannot be
    downloaded. Its values are NOT comparable to published LPIPS numbers (another network, no learned
    weights); compare them only with each other, under the same evaluation network.

    Images: uint8 (N, H, W, 3) arrays, (N, 3, H, W) tensors (uint8 or float in [-1, 1], quantised to
    uint8 first, as the network takes) or ImageSources; ``originals[i]`` pairs with ``reconstructions[i]``
    and both must have the same count and image size. Identical pairs give exactly 0.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    network = resolve_network(network, device)
    original_batches, num_originals = uint8_batches(originals, batch_size)
    reconstruction_batches, num_reconstructions = uint8_batches(reconstructions, batch_size)
    if num_originals != num_reconstructions:
        raise ValueError(f"{num_originals} originals but {num_reconstructions} reconstructions; "
                         f"the perceptual distance compares pairs")
    distances: list[torch.Tensor] = []
    for first, second in zip(original_batches, reconstruction_batches, strict=True):
        if first.shape != second.shape:
            raise ValueError(f"originals are {tuple(first.shape[1:])} and reconstructions {tuple(second.shape[1:])} "
                             f"per image (C, H, W); pairs must have the same size")
        # Two separate passes of equal shape: identical inputs give bitwise identical maps, hence exactly 0.
        first_maps = network.stage_features(first.to(network.device))
        second_maps = network.stage_features(second.to(network.device))
        total = torch.zeros(first.shape[0], device=network.device)
        for a, b in zip(first_maps, second_maps, strict=True):
            total += (_unit_normalise(a) - _unit_normalise(b)).square().mean(dim=(1, 2, 3))
        distances.append(total.float().cpu())
    return torch.cat(distances) if distances else torch.zeros(0)
