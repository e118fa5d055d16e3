"""Tiled encoding and decoding: run a map on overlapping spatial tiles and blend, so memory grows with the tile.

The map ``fn`` takes (B, C, H, W) to (B, C', H * r, W * r) with a fixed ratio r (the stride for a
decoder, 1 / stride for an encoder). Tiles are laid out on a grid of *units* (one latent position):
a unit is ``in_per_unit`` input pixels and ``out_per_unit`` output pixels. Neighbouring tiles share
``overlap`` units. Inside a shared strip each output pixel takes the weighted mean of the tiles that
cover it: a tile's weight is 0 on the quarter of the strip nearest its own edge, ramps linearly to 1
over the middle half, and is 1 beyond. The weights of two neighbours sum to 1, so a map whose output at
a pixel depends only on inputs within ``overlap / 4`` units of it gives the untiled result up to
rounding; maps with global parts (attention, GroupNorm statistics) are approximated, as in diffusers'
``enable_tiling``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start units of tiles of ``tile`` units covering ``length`` units, neighbours sharing >= ``overlap``."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]  # the last tile ends at the border


def _edge_ramp(size: int, overlap_px: int, ramp_low: bool, ramp_high: bool, device: torch.device) -> torch.Tensor:
    """Per-pixel weights along one axis of a tile: 1 inside, 0 -> 1 towards the interior on shared sides."""
    weight = torch.ones(size, device=device)
    quarter = overlap_px // 4
    ramp_len = overlap_px - 2 * quarter
    # Pixel centres across the middle half: (i + 0.5) / ramp_len, mirrored for the neighbour, so pairs sum to 1.
    ramp = (torch.arange(ramp_len, device=device, dtype=torch.float32) + 0.5) / ramp_len
    if ramp_low:
        weight[:quarter] = 0
        weight[quarter : quarter + ramp_len] = ramp
    if ramp_high:
        weight[size - quarter :] = 0
        weight[size - quarter - ramp_len : size - quarter] = ramp.flip(0)
    return weight


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    in_per_unit: int,
    out_per_unit: int,
) -> torch.Tensor:
    """``fn(x)`` computed on overlapping tiles of ``tile`` x ``tile`` units and blended (see the module doc).

    ``x``: (B, C, H, W) with H and W multiples of ``in_per_unit``. An input no larger than one tile goes
    through ``fn`` whole, so small inputs are unchanged. Raises ValueError for a tile not larger than the overlap.
    """
    if tile <= overlap or overlap < 0:
        raise ValueError(f"tile ({tile}) must exceed overlap ({overlap}) >= 0")
    height, width = x.shape[-2] // in_per_unit, x.shape[-1] // in_per_unit
    if height <= tile and width <= tile:
        return fn(x)
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = weights = None
    dtype = x.dtype
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            th, tw = min(tile, height), min(tile, width)
            piece = fn(x[..., top * in_per_unit : (top + th) * in_per_unit, left * in_per_unit : (left + tw) * in_per_unit])
            dtype = piece.dtype
            if out is None:
                shape = (*piece.shape[:-2], height * out_per_unit, width * out_per_unit)
                out = torch.zeros(shape, device=piece.device, dtype=torch.float32)
                weights = torch.zeros(shape[-2:], device=piece.device, dtype=torch.float32)
            # The actual overlap with the previous / next tile (the last tile may overlap more).
            up = (rows[i - 1] + th - top) if i > 0 else 0
            down = (top + th - rows[i + 1]) if i + 1 < len(rows) else 0
            west = (cols[j - 1] + tw - left) if j > 0 else 0
            east = (left + tw - cols[j + 1]) if j + 1 < len(cols) else 0
            wy = _ramp2(th * out_per_unit, up * out_per_unit, down * out_per_unit, piece.device)
            wx = _ramp2(tw * out_per_unit, west * out_per_unit, east * out_per_unit, piece.device)
            w = wy[:, None] * wx[None, :]
            ys, xs = top * out_per_unit, left * out_per_unit
            out[..., ys : ys + th * out_per_unit, xs : xs + tw * out_per_unit] += piece.float() * w
            weights[ys : ys + th * out_per_unit, xs : xs + tw * out_per_unit] += w
    return (out / weights).to(dtype)


def _ramp2(size: int, low_px: int, high_px: int, device: torch.device) -> torch.Tensor:
    low = _edge_ramp(size, low_px, True, False, device) if low_px else torch.ones(size, device=device)
    high = _edge_ramp(size, high_px, False, True, device) if high_px else torch.ones(size, device=device)
    return low * high
