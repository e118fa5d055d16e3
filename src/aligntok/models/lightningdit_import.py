"""``aligntok import-lightningdit``: a released reference LightningDiT checkpoint (hustvl/LightningDiT) as an aligntok
DiT directory.

Our :class:`~aligntok.models.lightningdit.LightningDiT` keeps the reference's parameter names and shapes, so
the conversion only picks the state dict (the EMA weights when present; ``module.`` / ``_orig_mod.`` prefixes
stripped), reads the config it reveals (:func:`infer_options`, :func:`preset_of`) and the reference's sampler
settings (:func:`reference_sampler_settings`), and loads strictly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aligntok.models.lightningdit import (
    LIGHTNINGDIT_PRESETS,
    LightningDiT,
    LightningDiTConfig,
    build_from_state_dict,
)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # DDP adds "module.", torch.compile "_orig_mod.", in either order.
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        stripped[name] = value
    return stripped


def _pick_state_dict(checkpoint_obj: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint_obj, dict):
        raise ValueError(f"{source}: expected a dict of state dicts, got {type(checkpoint_obj).__name__}")
    for key in ("ema", "model"):  # the EMA weights are the ones the reference samples with
        if key in checkpoint_obj:
            chosen = checkpoint_obj[key]
            break
    else:
        chosen = checkpoint_obj  # a bare state dict
    if not isinstance(chosen, dict) or not chosen or not all(isinstance(v, torch.Tensor) for v in chosen.values()):
        raise ValueError(f"{source}: no 'ema' or 'model' state dict found (top-level keys: {', '.join(map(str, list(checkpoint_obj)[:8]))})")
    return _strip_wrapper_prefixes(chosen)


def infer_options(state_dict: Mapping[str, torch.Tensor], preset_config: LightningDiTConfig) -> dict[str, Any]:
    """Config fields a reference state dict reveals: the option flags, channels, latent size and classes.

    Sizes that define the preset (depth, width, patch) are read too, so that a mismatch with the chosen
    preset is reported rather than silently followed.
    """
    if "x_embedder.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        return {}  # not recognisably LightningDiT; the key check will name what is missing
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    num_tokens = state_dict["pos_embed"].shape[1]
    options: dict[str, Any] = {
        "depth": len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
        "hidden_size": hidden,
        "patch_size": patch,
        "in_channels": in_channels,
        "input_size": math.isqrt(num_tokens) * patch,
        "use_swiglu": "blocks.0.mlp.w12.weight" in state_dict,
        "use_rmsnorm": "blocks.0.norm1.weight" in state_dict,
        "use_qknorm": "blocks.0.attn.q_norm.weight" in state_dict,
        "use_rope": "feat_rope.freqs_cos" in state_dict,
    }
    if "blocks.0.adaLN_modulation.1.weight" in state_dict:
        options["wo_shift"] = state_dict["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * hidden
    if "final_layer.linear.weight" in state_dict:
        options["learn_sigma"] = state_dict["final_layer.linear.weight"].shape[0] == 2 * patch * patch * in_channels
    if "y_embedder.embedding_table.weight" in state_dict:
        rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        options["num_classes"] = rows - int(preset_config.class_dropout_prob > 0)
    return options


def reference_sampler_settings(checkpoint_obj: Any) -> dict[str, Any]:
    """SamplerConfig fields for sampling a reference checkpoint as its authors did: guidance on the first 3
    channels (the reference's ``forward_with_cfg``), plus the scale, interval start, shift and steps of the
    ``sample`` section of the training config the reference saves in its checkpoints, when present (its
    defaults where a key is missing: no interval, no shift; its N grid points are N - 1 steps)."""
    settings: dict[str, Any] = {"cfg_channels": 3}
    config = checkpoint_obj.get("config") if isinstance(checkpoint_obj, dict) else None
    sample = config.get("sample") if isinstance(config, dict) else None
    if not isinstance(sample, dict):
        return settings
    if "cfg_scale" in sample:
        settings["cfg_scale"] = float(sample["cfg_scale"])
    settings["cfg_interval_start"] = float(sample.get("cfg_interval_start", 0.0))
    settings["timestep_shift"] = float(sample.get("timestep_shift", 0.0))
    if isinstance(sample.get("num_sampling_steps"), int) and sample["num_sampling_steps"] > 1:
        settings["num_steps"] = sample["num_sampling_steps"] - 1
    if sample.get("sampling_method") == "euler":
        settings["method"] = "euler"
    return settings


def preset_of(**sizes: int) -> str | None:
    """The one preset whose depth / hidden_size / num_heads / patch_size equal those given, or None
    (width and patch alone already single one out: no two sizes share a width)."""
    fields = ("depth", "hidden_size", "num_heads", "patch_size")
    matches = [
        name for name, values in LIGHTNINGDIT_PRESETS.items()
        if all(dict(zip(fields, values, strict=True))[key] == value for key, value in sizes.items())
    ]  # fmt: skip
    return matches[0] if len(matches) == 1 else None


def import_lightningdit_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    preset: str | None = None,
    **overrides: Any,
) -> LightningDiT:
    """Convert a reference checkpoint (a torch file holding ``model`` and/or ``ema`` state dicts, or a bare
    state dict) into a :meth:`LightningDiT.save_pretrained` directory and return the loaded model.

    The EMA weights are taken when present; ``module.`` / ``_orig_mod.`` prefixes are stripped. The preset
    (depth, width, heads, patch) is inferred from the weights' depth, width and patch size; a ``preset``
    given is checked against them. Option flags, channels, latent size and number of classes are read from
    the checkpoint unless given in ``overrides`` (LightningDiTConfig fields). The reference's sampler settings
    (:func:`reference_sampler_settings`) are recorded with the model. Any key, shape or preset that does
    not fit is named in a one-line ValueError.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-tensor pickles and corrupt files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # torch's weights-only refusal opens with advice to unpickle anyway; its reason follows a marker line
        marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
        reason = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else lines[0]
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({reason})") from None
    state_dict = _pick_state_dict(raw, str(path))
    # Of the config, only class_dropout_prob (the null label's row) matters to the inference.
    dropout = overrides.get("class_dropout_prob", LightningDiTConfig.class_dropout_prob)
    inferred = {k: v for k, v in infer_options(state_dict, LightningDiTConfig(class_dropout_prob=dropout)).items() if k not in overrides}
    found = {name: inferred.pop(name) for name in ("depth", "hidden_size", "patch_size") if name in inferred}
    describe = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())
    if preset is None:
        if "hidden_size" not in found or "patch_size" not in found:
            raise ValueError(f"{path}: its keys do not show the model's width and patch size; give the preset")
        preset = preset_of(**found)
        if preset is None:
            raise ValueError(f"{path} holds {describe(found)}, which is no LightningDiT preset ({', '.join(LIGHTNINGDIT_PRESETS)})")
    preset_config = LightningDiTConfig.from_preset(preset, **overrides)
    wanted = {name: getattr(preset_config, name) for name in found}
    if found != wanted:
        raise ValueError(f"{path} holds {describe(found)} but preset {preset} has {describe(wanted)}; pick the matching preset")
    config = dataclasses.replace(preset_config, **inferred)
    config.validate()
    model = build_from_state_dict(config, state_dict, source=str(path))
    model.sampler_settings = reference_sampler_settings(raw)
    model.save_pretrained(out_dir)
    return model
