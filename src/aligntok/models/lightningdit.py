"""LightningDiT: the class-conditional diffusion transformer trained on the tokenizer's latents.

A re-implementation of the LightningDiT of VA-VAE (hustvl/LightningDiT, ``models/lightningdit.py``)
with the same parameter names, shapes and maths, so that its released checkpoints load with
``strict=True`` and give the same outputs for the same weights and inputs. Options: SwiGLU feed-forward,
2-D rotary position embedding (EVA style, interleaved pairs), RMSNorm, QK-norm, shift-free adaLN,
class-label dropout for classifier-free guidance and an optional learned-sigma head (its second half is
dropped, as in the reference). Attention goes through ``F.scaled_dot_product_attention``.

The model only maps ``(x, t, y)`` to a velocity; the loss lives in :mod:`aligntok.diffusion.transport`
and guidance in :mod:`aligntok.diffusion.samplers`. Time follows the reference (SiT) convention:
``t = 0`` is pure noise and ``t = 1`` is data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from aligntok.config import ConfigError, config_from_dict, config_to_dict
from aligntok.io import read_json_document, reading, write_directory_atomically
from aligntok.training.checkpoint import describe_state_mismatch, state_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "aligntok-lightningdit"  # written into config.json so a tokenizer dir is not mistaken for a DiT

# name -> (depth, hidden_size, num_heads, patch_size). The reference's registry plus S/1, S/2 (DiT-S
# sizes) and L/1, which the reference lists only at patch 2.
LIGHTNINGDIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    f"LightningDiT-{size}/{patch}": (depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in {
        "S": (12, 384, 6),
        "B": (12, 768, 12),
        "L": (24, 1024, 16),
        "XL": (28, 1152, 16),
        "1p0B": (24, 1536, 24),
        "1p6B": (28, 1792, 28),
    }.items()
    for patch in (1, 2)
}


@dataclasses.dataclass
class LightningDiTConfig:
    """Architecture of a LightningDiT. Defaults: the paper's LightningDiT-XL/1 on 16x16x32 latents."""

    input_size: int = 16  #: latent height = width the model is built for (image side / 16)
    in_channels: int = 32  #: latent channels
    patch_size: int = 1  #: side of the square patches the latent is cut into
    hidden_size: int = 1152  #: transformer width
    depth: int = 28  #: number of transformer blocks
    num_heads: int = 16  #: attention heads
    mlp_ratio: float = 4.0  #: feed-forward width / hidden_size (SwiGLU uses 2/3 of it, as the reference)
    num_classes: int = 1000  #: class labels; index num_classes is the null label when class dropout > 0
    class_dropout_prob: float = 0.1  #: probability a training label is replaced by the null label (CFG)
    learn_sigma: bool = False  #: reference's learned-sigma head (output doubled, second half dropped)
    use_qknorm: bool = False  #: normalise queries and keys per head (paper: on for the 800-epoch run)
    use_swiglu: bool = True  #: SwiGLU feed-forward instead of a GELU MLP
    use_rope: bool = True  #: 2-D rotary position embedding on queries and keys
    use_rmsnorm: bool = True  #: RMSNorm (with weight) instead of affine-free LayerNorm
    wo_shift: bool = False  #: adaLN without the shift terms (scale and gate only)
    gradient_checkpointing: bool = False  #: recompute blocks in the backward pass to save memory

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> LightningDiTConfig:
        """The config of a named preset (see ``LIGHTNINGDIT_PRESETS``) with field overrides."""
        if preset not in LIGHTNINGDIT_PRESETS:
            raise ConfigError(f"unknown LightningDiT preset {preset!r}; choose from {', '.join(LIGHTNINGDIT_PRESETS)}")
        depth, hidden_size, num_heads, patch_size = LIGHTNINGDIT_PRESETS[preset]
        sizes = {"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads, "patch_size": patch_size}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown LightningDiT config field(s): {', '.join(sorted(unknown))}")
        config = cls(**{**sizes, **overrides})
        config.validate()
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Tokens per side."""
        return self.input_size // self.patch_size

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden_size(self) -> int:
        # The reference computes int(hidden * ratio), then int(2/3 * that) for SwiGLU; keep the same
        # float rounding so that released weights fit.
        hidden = int(self.hidden_size * self.mlp_ratio)
        return int(2 / 3 * hidden) if self.use_swiglu else hidden

    def validate(self) -> None:
        positive = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.input_size % self.patch_size:
            raise ConfigError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % 4:
            raise ConfigError(f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        if self.use_rope and self.head_dim % 4:
            raise ConfigError(f"use_rope needs a head dim divisible by 4, got {self.head_dim}")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ConfigError(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1]")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio={self.mlp_ratio} must be positive")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 (as the reference) with the fused kernel, returned in the input dtype.

    Under bf16 autocast torch's own module would see a bf16 input and an fp32 weight and fall back to
    its slow unfused path.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=1e-6)  # the reference's eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def _norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    # The reference's RMSNorm has a weight; its LayerNorm has no affine parameters.
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    scaled = x * (1 + scale.unsqueeze(1))
    return scaled if shift is None else scaled + shift.unsqueeze(1)


def sincos_position_embedding(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, (grid_size**2, embed_dim): first half encodes the column, second the row.

    Same values as MAE/DiT's ``get_2d_sincos_pos_embed`` (float64 maths, then float32).
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # DiT's meshgrid puts w first, so its "grid_h" half actually encodes the column index.
    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


class RotaryEmbedding2D(nn.Module):
    """EVA-02's 2-D rotary embedding (``VisionRotaryEmbeddingFast``): half the head dim rotates with the
    row index, half with the column, on interleaved (even, odd) pairs. Its tables are saved buffers, as
    in the reference, so they travel with checkpoints."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0) -> None:
        super().__init__()
        axis_dim = head_dim // 2
        inv_freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim)
        # arange / n * n, as the reference, so that tables match it to the last bit.
        positions = torch.arange(grid_size) / grid_size * grid_size
        angles = torch.einsum("i,f->if", positions, inv_freq).repeat_interleave(2, dim=-1)  # (grid, axis_dim)
        rows = angles[:, None, :].expand(grid_size, grid_size, axis_dim)
        cols = angles[None, :, :].expand(grid_size, grid_size, axis_dim)
        table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (..., tokens, head_dim); any leading dims (e.g. q and k stacked) broadcast."""
        # The reference's rotate_half is (-odd, even) per pair, times sin. Swapping each pair (one copy)
        # and negating sin on the even slots instead gives the same fp32 bits, since (-a) * b == a * (-b),
        # with one elementwise pass fewer.
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        signs = torch.tensor([-1.0, 1.0], device=x.device).repeat(self.freqs_sin.shape[-1] // 2)
        sin = self.freqs_sin * signs
        cos = self.freqs_cos
        if x.dtype != cos.dtype:
            # Under autocast: bf16 tables keep the maths in x's dtype rather than promoting to fp32 and casting back.
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + swapped * sin


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm and rotary embedding."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, use_rmsnorm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # The reference's QK-norm is RMSNorm(eps 1e-6) or an affine LayerNorm with torch's default eps.
        make_norm = (lambda: RMSNorm(head_dim)) if use_rmsnorm else (lambda: nn.LayerNorm(head_dim))
        self.q_norm = make_norm() if qk_norm else nn.Identity()
        self.k_norm = make_norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D | None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, T, head_dim)
        q, k, v = qkv.unbind(0)
        if rope is not None and isinstance(self.q_norm, nn.Identity):
            q, k = rope(qkv[:2]).unbind(0)  # one rotation pass for q and k together
        else:
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward with the gate and value projections fused in one matrix (``w12``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class GeluMLP(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm ``Mlp`` names: fc1, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _ada_ln(hidden_size: int, chunks: int) -> nn.Sequential:
    # Sequential so that the linear layer is named "adaLN_modulation.1", as in the reference.
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens (timm ``PatchEmbed`` names: ``proj``)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (cos half first, max period 10000) followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding; with dropout > 0 it has one extra row, the null label used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(dropped, self.num_classes, labels)
        return self.embedding_table(labels)


class LightningDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""

    def __init__(self, config: LightningDiTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.norm1 = _norm(hidden, config.use_rmsnorm)
        self.attn = Attention(hidden, config.num_heads, config.use_qknorm, config.use_rmsnorm)
        self.norm2 = _norm(hidden, config.use_rmsnorm)
        mlp_cls = SwiGLUFFN if config.use_swiglu else GeluMLP
        self.mlp = mlp_cls(hidden, config.mlp_hidden_size)
        self.wo_shift = config.wo_shift
        self.adaLN_modulation = _ada_ln(hidden, 4 if config.wo_shift else 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RotaryEmbedding2D | None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patches."""

    def __init__(self, config: LightningDiTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.norm_final = _norm(hidden, config.use_rmsnorm)
        self.linear = nn.Linear(hidden, config.patch_size**2 * config.out_channels)
        self.adaLN_modulation = _ada_ln(hidden, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LightningDiT(nn.Module):
    """Class-conditional diffusion transformer: ``model(x, t, y)`` -> velocity, shaped like ``x``.

    ``x``: (B, in_channels, input_size, input_size) latents; ``t``: (B,) or scalar time in [0, 1] with
    0 = noise, 1 = data; ``y``: (B,) integer labels in [0, num_classes], num_classes being the null label.
    """

    def __init__(self, config: LightningDiTConfig | None = None) -> None:
        super().__init__()
        config = config or LightningDiTConfig()
        config.validate()
        self.config = config
        self.x_embedder = PatchEmbed(config.in_channels, config.hidden_size, config.patch_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # A saved buffer (the reference has a frozen parameter of the same name and shape), so that the
        # optimizer and EMA never see it while checkpoints still carry it.
        self.register_buffer("pos_embed", sincos_position_embedding(config.hidden_size, config.grid_size)[None])
        self.feat_rope = RotaryEmbedding2D(config.head_dim, config.grid_size) if config.use_rope else None
        self.blocks = nn.ModuleList(LightningDiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.initialize_weights()
        # Not weights, but part of what a trained model is: saved in config.json by save_pretrained.
        #: {"mean": [C floats], "std": [C floats]}: the per-channel statistics its training latents were
        #: normalised with (set by train-dit); samples are de-normalised with these. None: unknown.
        self.latent_stats: dict[str, list[float]] | None = None
        #: SamplerConfig fields ``aligntok sample`` starts from (the training config's ``sample``); None: defaults.
        self.sampler_settings: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_label(self) -> int | None:
        """The label that means "no class" (for guidance), or None when the model was built without one."""
        return self.config.num_classes if self.config.class_dropout_prob > 0 else None

    def initialize_weights(self) -> None:
        """The reference's initialisation: Xavier linears, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        patch_weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for modulation in [block.adaLN_modulation for block in self.blocks] + [self.final_layer.adaLN_modulation]:
            nn.init.zeros_(modulation[-1].weight)
            nn.init.zeros_(modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @staticmethod
    def can_compile(device: torch.device | str) -> bool:
        """Whether inductor can generate code for ``device``: on the CPU it needs a C++ compiler (CXX, c++, g++ or clang++)."""
        if torch.device(device).type != "cpu":
            return True
        return any(shutil.which(cc) for cc in (os.environ.get("CXX", "c++"), "g++", "clang++"))

    def compile_repeated_blocks(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` each transformer block in place (``Module.compile``; diffusers' method name).

        As the reference's ``@torch.compile`` on its blocks: one graph serves every block, the state dict
        keeps its plain names (no ``_orig_mod.``), and the label dropout's random draw stays eager, so a
        compiled training run consumes the same random numbers as an eager one. ``compile_kwargs`` go to
        ``torch.compile`` (e.g. ``backend``, ``mode``). Inductor on CPU needs a C++ compiler.
        """
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"LightningDiT expects x of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        if y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        return t

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W), patch pixels ordered (row, column, channel) as the reference."""
        p, grid, channels = self.config.patch_size, self.config.grid_size, self.config.out_channels
        x = tokens.reshape(tokens.shape[0], grid, grid, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], channels, grid * p, grid * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        t = self._check_inputs(x, torch.as_tensor(t, device=x.device), y)
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, self.feat_rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, self.feat_rope)
        out = self.unpatchify(self.final_layer(tokens, c))
        return out[:, : self.config.in_channels] if self.config.learn_sigma else out

    # -----------------------------------------------------------------------------------------
    # Persistence: config.json + model.safetensors
    # -----------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors to ``directory``, atomically (temp dir, then rename)."""
        from aligntok import __version__

        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        document = {"format": FORMAT_NAME, "aligntok_version": __version__, "config": config_to_dict(self.config)}
        if self.latent_stats is not None:
            document["latent_stats"] = {key: [float(v) for v in self.latent_stats[key]] for key in ("mean", "std")}
        if self.sampler_settings is not None:
            document["sampler"] = dict(self.sampler_settings)

        def write(tmp: Path) -> None:
            (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "model": "LightningDiT"})

        return write_directory_atomically(directory, write)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LightningDiT:
        """Load a directory written by :meth:`save_pretrained`, or a hub id ``ORG/NAME[:SUBFOLDER]`` of one (offline
        from the local Hugging Face cache with ``HF_HUB_OFFLINE=1``), with the latent statistics and sampler
        settings recorded beside the weights. Strict: every key must match."""
        from aligntok.hub import resolve_directory

        directory = resolve_directory(str(directory), what="LightningDiT", error=ValueError)
        weights_path = directory / WEIGHTS_FILE
        document = read_pretrained_document(directory)
        if not weights_path.is_file():
            raise ValueError(f"not a LightningDiT directory: {weights_path} is missing")
        config = config_from_dict(LightningDiTConfig, document["config"])
        with reading(weights_path):
            state = load_file(str(weights_path))
        model = build_from_state_dict(config, state, source=str(weights_path))
        model.latent_stats = _checked_latent_stats(document.get("latent_stats"), config.in_channels, directory / CONFIG_FILE)
        model.sampler_settings = document.get("sampler")
        return model.to(device=device, dtype=dtype)


def read_pretrained_document(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a :meth:`LightningDiT.save_pretrained` directory or hub id (no weights are read).

    Keys: ``format``, ``config`` (LightningDiTConfig fields) and, when recorded, ``latent_stats`` and
    ``sampler``. Raises a one-line ValueError for a missing, invalid or foreign file.
    """
    from aligntok.hub import resolve_directory

    config_path = resolve_directory(str(directory), what="LightningDiT", error=ValueError) / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"not a LightningDiT directory: {config_path} is missing")
    document = read_json_document(config_path, FORMAT_NAME, "a LightningDiT config", required=("config",))
    if "sampler" in document and not isinstance(document["sampler"], dict):
        raise ValueError(f"{config_path}: 'sampler' must be a mapping of SamplerConfig fields")
    return document


def _checked_latent_stats(stats: Any, channels: int, source: Path) -> dict[str, list[float]] | None:
    from aligntok.models.tokenizer import validate_latent_stats

    if stats is None:
        return None
    if not isinstance(stats, dict) or not isinstance(stats.get("mean"), list) or not isinstance(stats.get("std"), list):
        raise ValueError(f"{source}: 'latent_stats' must hold 'mean' and 'std' lists")
    try:
        validate_latent_stats(stats["mean"], stats["std"], channels)
    except ConfigError as e:
        raise ValueError(f"{source}: {e}") from None
    return {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}


def build_from_state_dict(config: LightningDiTConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> LightningDiT:
    """A LightningDiT of ``config`` holding ``state_dict`` (float32), or a one-line ValueError naming the
    missing / unexpected / mis-shaped keys. Built on the meta device so no time goes to initialisation."""
    with torch.device("meta"):
        model = LightningDiT(config)
    problem = describe_state_mismatch(state_shapes(model), {k: tuple(v.shape) for k, v in state_dict.items()})
    if problem:
        raise ValueError(f"{source} does not fit LightningDiT({_short_config(config)}): {problem}")
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def _short_config(config: LightningDiTConfig) -> str:
    flags = [name for name in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "learn_sigma") if getattr(config, name)]
    return (
        f"depth={config.depth}, hidden={config.hidden_size}, heads={config.num_heads}, patch={config.patch_size}, "
        f"in_channels={config.in_channels}, input_size={config.input_size}, {'+'.join(flags) or 'no options'}"
    )
