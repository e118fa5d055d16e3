"""``aligntok import-vavae``: a released VA-VAE checkpoint (latent-diffusion layout) as a diffusers AutoencoderKL.

VA-VAE (Yao et al., "Reconstruction vs. Generation", CVPR 2025; hustvl/LightningDiT) has exactly the
latent-diffusion KL-VAE architecture, with self-attention after every residual block of the lowest
resolution (``attn_resolutions: [16]`` at 256 px) besides the middle blocks. Its checkpoints hold a
``state_dict`` with LDM names (``encoder.down.I.block.J.*``, ``encoder.down.I.attn.J.*``, ``encoder.mid.*``,
``decoder.up.I.*``, ``quant_conv``, ``post_quant_conv``) next to training-only weights (``loss.*``, the frozen
``foundation_model.*``), which are dropped.

The architecture is read from the checkpoint (channels, levels, residual blocks per level, which levels
attend, latent channels), so no preset is named. diffusers' LDM converter
(``diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint``) renames everything but the attention
inside the levels, which SD's VAE lacks; those are renamed with diffusers' own attention renamer and the
levels become ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``. Loading is strict, so any tensor left
over or missing is an error.

The result is a diffusers model directory (``AutoencoderKL.from_pretrained`` reads it; so does every
aligntok command, as a tokenizer). LightningDiT normalises VA-VAE latents with per-channel statistics
(its ``latents_stats.pt``: ``mean`` and ``std`` of shape (1, C, 1, 1)) and ``latent_multiplier`` 1.0; given
``latent_stats``, they go into the config as ``latents_mean`` / ``latents_std`` with ``scaling_factor`` the
multiplier, which is how diffusers and aligntok both read them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aligntok.hub import model_card
from aligntok.io import write_directory_atomically

log = logging.getLogger(__name__)

VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LDM_NORM_GROUPS = 32  # latent-diffusion's Normalize: GroupNorm(32, C, eps=1e-6)


def read_ldm_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The VAE's tensors of a torch or safetensors checkpoint (``state_dict``-wrapped or bare), LDM names.

    A ``first_stage_model.`` prefix (a whole latent-diffusion model's checkpoint) is stripped; training-only
    tensors are dropped. Raises FileNotFoundError / ValueError (one line) for a missing or foreign file.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded: Any = load_file(str(path))
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a foreign file
            raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds no state dict")
    state = {}
    for key, value in loaded.items():
        key = key.removeprefix("first_stage_model.")
        if key.startswith(VAE_PREFIXES) and isinstance(value, torch.Tensor):
            state[key] = value
    if "encoder.conv_in.weight" not in state or "decoder.conv_out.weight" not in state:
        raise ValueError(f"{path} is not a latent-diffusion VAE checkpoint (no encoder.conv_in / decoder.conv_out weights)")
    return state


def _indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for key in state if (m := re.match(pattern, key))})


def diffusers_config_from_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The AutoencoderKL config of an LDM VAE state dict, read from its tensor names and shapes."""
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    blocks = _indices(state, r"encoder\.down\.0\.block\.(\d+)\.")
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    latent = state["decoder.conv_in.weight"].shape[1]
    embed = state["post_quant_conv.weight"].shape[1] if "post_quant_conv.weight" in state else latent
    if embed != latent:
        raise ValueError(f"embed_dim {embed} differs from z_channels {latent}: diffusers' AutoencoderKL needs them equal")
    if levels != list(range(len(levels))) or any(w % LDM_NORM_GROUPS for w in widths):
        raise ValueError(f"unexpected encoder levels {levels} / widths {widths} for an LDM VAE")
    encoder_attn = set(_indices(state, r"encoder\.down\.(\d+)\.attn\."))
    decoder_attn = set(_indices(state, r"decoder\.up\.(\d+)\.attn\."))
    n = len(levels)
    return {
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in encoder_attn else "DownEncoderBlock2D" for i in range(n)],
        # diffusers lists the decoder's levels from the lowest resolution up; LDM numbers them the other way.
        "up_block_types": ["AttnUpDecoderBlock2D" if n - 1 - k in decoder_attn else "UpDecoderBlock2D" for k in range(n)],
        "block_out_channels": widths,
        "layers_per_block": len(blocks),
        "latent_channels": latent,
        "norm_num_groups": LDM_NORM_GROUPS,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
    }


def convert_ldm_vae(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An LDM VAE state dict renamed (and attention convolutions reshaped) for diffusers' AutoencoderKL."""
    try:
        from diffusers.loaders.single_file_utils import (
            convert_ldm_vae_checkpoint,
            update_vae_attentions_ldm_to_diffusers,
        )
    except ImportError as e:  # the converter is diffusers' single-file loader's; name what is missing
        raise ValueError(f"this diffusers version lacks its LDM VAE converter ({e}); install diffusers>=0.31") from None
    level_attention = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.attn\.")
    rest = {k: v for k, v in state.items() if not level_attention.match(k)}
    converted = convert_ldm_vae_checkpoint(rest, dict(config))
    n = len(config["block_out_channels"])
    for key in sorted(state.keys() - rest.keys()):
        side, level = level_attention.match(key).groups()  # type: ignore[union-attr]
        level = int(level)
        new = f"encoder.down_blocks.{level}.attentions" if side == "encoder.down" else f"decoder.up_blocks.{n - 1 - level}.attentions"
        update_vae_attentions_ldm_to_diffusers([key], converted, state, mapping={"old": f"{side}.{level}.attn", "new": new})
    return converted


def import_vavae_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    latent_stats: str | os.PathLike | None = None,
    scaling_factor: float = 1.0,
) -> Any:
    """Convert a VA-VAE (or any latent-diffusion KL-VAE) checkpoint into a diffusers AutoencoderKL directory.

    ``latent_stats``: LightningDiT's ``latents_stats.pt`` (``mean``, ``std``, (1, C, 1, 1)), stored as the
    config's ``latents_mean`` / ``latents_std``; ``scaling_factor``: LightningDiT's ``latent_multiplier``
    (1.0 for VA-VAE). Without statistics the latents are normalised by ``scaling_factor`` only: run
    ``aligntok cache-latents`` to compute per-channel ones. The directory is written atomically; returns
    the loaded ``AutoencoderKL``. Raises one-line FileNotFoundError / ValueError for unusable inputs.
    """
    from diffusers import AutoencoderKL

    from aligntok.eval.provenance import sha256_file

    if not (math.isfinite(scaling_factor) and scaling_factor > 0):
        raise ValueError(f"--scaling-factor must be a positive number, got {scaling_factor}")
    state = read_ldm_state_dict(checkpoint)
    config = diffusers_config_from_ldm(state)
    config["scaling_factor"] = float(scaling_factor)
    if latent_stats is not None:
        mean, std = _read_latent_stats(latent_stats, config["latent_channels"])
        config.update(latents_mean=mean, latents_std=std)
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae(state, config)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not fit the architecture read from it: {len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors (first: {(list(missing) or list(unexpected))[0]})"
        )
    vae.eval()
    body = "\n".join([
        "# VA-VAE (converted by aligntok)",
        "",
        "A latent-diffusion KL-VAE converted to diffusers' `AutoencoderKL` by `aligntok import-vavae`.",
        "Use it as a tokenizer in any aligntok command, or with `AutoencoderKL.from_pretrained`.",
        "",
        f"- Source checkpoint: `{Path(checkpoint).name}` (sha256 `{sha256_file(checkpoint)}`).",
        f"- Latent statistics: {'from ' + Path(latent_stats).name if latent_stats else 'none (run aligntok cache-latents)'}.",
    ])

    def write(staging: Path) -> None:
        vae.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(body, tags=["aligntok", "vavae", "image-tokenizer"], license=None))

    write_directory_atomically(out_dir, write)
    if latent_stats is None:
        log.warning("no --latent-stats: latents are only scaled by %s; compute per-channel statistics with cache-latents", scaling_factor)
    return vae


def _read_latent_stats(path: str | os.PathLike, channels: int) -> tuple[list[float], list[float]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent statistics {path} do not exist")
    if path.suffix == ".json":  # e.g. an aligntok cache.json
        stats: Any = json.loads(path.read_text())
        mean, std = stats.get("latent_mean"), stats.get("latent_std")
    else:
        stats = torch.load(path, map_location="cpu", weights_only=True)
        mean, std = (stats.get("mean"), stats.get("std")) if isinstance(stats, Mapping) else (None, None)
    if mean is None or std is None:
        raise ValueError(f"{path} holds no mean/std latent statistics")
    mean_list = [float(v) for v in torch.as_tensor(mean, dtype=torch.float64).flatten()]
    std_list = [float(v) for v in torch.as_tensor(std, dtype=torch.float64).flatten()]
    if len(mean_list) != channels or len(std_list) != channels:
        raise ValueError(f"{path} has statistics for {len(mean_list)} channels, the VAE has {channels}")
    return mean_list, std_list
