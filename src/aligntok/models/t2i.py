"""The text-to-image transformer: diffusers' ``FluxTransformer2DModel`` behind one thin aligntok module.

The FLUX architecture (double-stream MMDiT blocks, then single-stream parallel blocks, 3-axis RoPE over
text and image positions, QK RMSNorm, a pooled text vector added to the timestep embedding) comes from
diffusers unchanged. :class:`T2ITransformer` owns what diffusers does not:

* **Initialisation.** diffusers leaves every Linear at PyTorch's default. Here: DiT/SiT's init (Xavier
  Linears, normal(0.02) timestep MLP) with every adaLN modulation and the output projection zeroed, so at
  step 0 every block is the identity and the output is exactly 0.
* **Conventions (the one place they are converted).** aligntok's transport has ``t = 0`` at noise and
  velocity ``data - noise``; diffusers/FLUX have ``sigma = 1`` at noise and velocity ``noise - data``
  (and scale sigma by 1000 inside the model). So the inner model gets ``sigma = 1 - t`` and its output
  is negated.
* **Packing.** Latents are cut into ``pack x pack`` patches (FluxPipeline's ``_pack_latents`` layout):
  pack 1 for f16 AlignTok latents, 2 for f8 VAEs, so both give the same token count.
* **Positions.** Image token (i, j) of the packed grid has RoPE id (0, i, j); text tokens have (0, 0, 0)
  (FLUX's ``_prepare_latent_image_ids``). Any grid, square or not, works.
* **Text mask.** Padding tokens are masked out of the joint attention (``mask_padding``) through
  ``joint_attention_kwargs["attention_mask"]``, the only way diffusers takes one.
* **Attention kernels.** SDPA may use flash, memory-efficient or math kernels, never cuDNN's: on an H200
  (torch 2.11, cuDNN 9) FLUX-2B's training step (head dim 128, batch 32) failed in the cuDNN attention
  backward (``mha_graph.execute(...).is_good()``, then illegal memory accesses), masked or not, and ran with
  cuDNN excluded. A known PyTorch defect (pytorch/pytorch#122695, #134001).

``forward(x (B, C, H, W), t (B,), text (B, L, D), text_mask (B, L) bool, pooled (B, P)) -> v (B, C, H, W)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from aligntok.config import ConfigError, config_from_dict, config_to_dict
from aligntok.io import read_json_document, write_directory_atomically

FORMAT_NAME = "aligntok-t2i"
INFO_FILE = "aligntok_t2i.json"
TRANSFORMER_DIR = "transformer"  # diffusers' own layout: FluxTransformer2DModel.from_pretrained reads it
# Every SDPA kernel but cuDNN's (see the module doc), in PyTorch's own order of preference.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

#: name -> (double-stream blocks, single-stream blocks, heads, head dim, RoPE axes dims, note).
T2I_PRESETS: dict[str, tuple[int, int, int, int, tuple[int, int, int], str]] = {
    "FLUX-tiny": (2, 4, 4, 16, (4, 6, 6), "CPU tests and the offline demo"),
    "FLUX-S": (6, 12, 6, 128, (16, 56, 56), "width 768"),
    "FLUX-1B": (8, 16, 12, 128, (16, 56, 56), "width 1536; a cheaper comparison"),
    "FLUX-2B": (14, 28, 12, 128, (16, 56, 56),
                "width 1536, FLUX's 1:2 double:single ratio; INFERRED: the paper says only '2B FLUX-architecture'"),
    "FLUX.1-12B": (19, 38, 24, 128, (16, 56, 56), "FLUX.1's own shape (width 3072)"),
}
PRESET_FIELDS = ("num_layers", "num_single_layers", "num_heads", "head_dim", "axes_dims_rope")


@dataclasses.dataclass
class T2IConfig:
    """Architecture of the T2I transformer. Defaults: FLUX-tiny on 16-channel latents with a 32-d text encoder."""

    in_channels: int = 16  #: latent channels (before packing)
    pack: int = 1  #: latent pixels per token side (1 for f16 tokenizers, 2 for f8 VAEs)
    num_layers: int = 2  #: double-stream (MMDiT) blocks
    num_single_layers: int = 4  #: single-stream blocks
    num_heads: int = 4  #: attention heads
    head_dim: int = 16  #: per-head width (FLUX: 128); width = num_heads * head_dim
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  #: RoPE dims per id axis; even, summing to head_dim
    text_dim: int = 32  #: width of the sequence text encoder's states (T5-XXL: 4096)
    pooled_dim: int = 32  #: width of the pooled text vector (CLIP-L: 768)
    mask_padding: bool = True  #: mask text padding out of attention (False: FLUX's unmasked behaviour)
    gradient_checkpointing: bool = False  #: recompute blocks in the backward pass to save memory

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> T2IConfig:
        """The config of a :data:`T2I_PRESETS` entry with the other fields from ``overrides``."""
        if preset not in T2I_PRESETS:
            raise ConfigError(f"unknown T2I preset {preset!r}; choose from {', '.join(T2I_PRESETS)}")
        clash = sorted(set(overrides) & set(PRESET_FIELDS))
        if clash:
            raise ConfigError(f"{', '.join(clash)} are fixed by preset {preset}")
        sizes = dict(zip(PRESET_FIELDS, T2I_PRESETS[preset][:5], strict=True))
        config = cls(**{**overrides, **sizes})
        config.validate()
        return config

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def token_channels(self) -> int:
        return self.in_channels * self.pack * self.pack

    def validate(self) -> None:
        for name in ("in_channels", "pack", "num_heads", "head_dim", "text_dim", "pooled_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.num_layers < 0 or self.num_single_layers < 0 or self.num_layers + self.num_single_layers == 0:
            raise ConfigError("need at least one block (num_layers + num_single_layers >= 1)")
        axes = tuple(self.axes_dims_rope)
        if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes) or sum(axes) != self.head_dim:
            raise ConfigError(
                f"axes_dims_rope={list(axes)} must be 3 positive even numbers summing to head_dim={self.head_dim}"
            )


def pack_latents(x: torch.Tensor, pack: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p), FluxPipeline's ``_pack_latents`` order (channel, row, col)."""
    b, c, h, w = x.shape
    if h % pack or w % pack:
        raise ValueError(f"latent grid {h}x{w} is not divisible by the packing {pack}")
    x = x.reshape(b, c, h // pack, pack, w // pack, pack).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // pack) * (w // pack), c * pack * pack)


def unpack_latents(tokens: torch.Tensor, pack: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a (height, width) latent grid."""
    b, _, d = tokens.shape
    c = d // (pack * pack)
    x = tokens.reshape(b, height // pack, width // pack, c, pack, pack).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE ids (rows * cols, 3) of a packed grid: (0, i, j), row-major."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device)


_MASK_SINCE = (0, 32)  # diffusers PR #10122: before 0.32 Flux's attention silently ignored the mask


def _build_flux(config: T2IConfig) -> nn.Module:
    import diffusers
    from diffusers import FluxTransformer2DModel

    version = tuple(int(p) for p in diffusers.__version__.split(".")[:2] if p.isdigit())
    if config.mask_padding and version < _MASK_SINCE:
        raise ConfigError(f"diffusers {diffusers.__version__} ignores Flux attention masks: install diffusers>=0.32 "
                          "or set mask_padding=false")

    return FluxTransformer2DModel(
        patch_size=1, in_channels=config.token_channels, num_layers=config.num_layers,
        num_single_layers=config.num_single_layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads, joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.pooled_dim, guidance_embeds=False, axes_dims_rope=tuple(config.axes_dims_rope),
    )


class T2ITransformer(nn.Module):
    """``model(x, t, text, text_mask, pooled)`` -> velocity in aligntok's convention (see the module doc).

    ``x``: (B, in_channels, H, W) normalised latents, H and W multiples of ``pack``; ``t``: (B,) or a scalar,
    0 = noise, 1 = data; ``text``: (B, L, text_dim); ``text_mask``: (B, L) bool, True = a real token (None =
    all real); ``pooled``: (B, pooled_dim).
    """

    def __init__(self, config: T2IConfig | None = None, *, initialize: bool = True) -> None:
        super().__init__()
        config = config or T2IConfig()
        config.validate()
        self.config = config
        self.transformer = _build_flux(config)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if initialize:
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier Linears, normal(0.02) timestep MLP, zeroed adaLN modulations and output."""
        flux = self.transformer
        for module in flux.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        timestep = flux.time_text_embed.timestep_embedder
        nn.init.normal_(timestep.linear_1.weight, std=0.02)
        nn.init.normal_(timestep.linear_2.weight, std=0.02)
        modulations = [b.norm1.linear for b in flux.transformer_blocks]
        modulations += [b.norm1_context.linear for b in flux.transformer_blocks]
        modulations += [b.norm.linear for b in flux.single_transformer_blocks]
        for linear in [*modulations, flux.norm_out.linear, flux.proj_out]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _check(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None, pooled: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text must be (B={b}, L, {cfg.text_dim}), got {tuple(text.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        if tuple(pooled.shape) != (b, cfg.pooled_dim):
            raise ValueError(f"pooled must be ({b}, {cfg.pooled_dim}), got {tuple(pooled.shape)}")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, text: torch.Tensor, text_mask: torch.Tensor | None,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        self._check(x, text, text_mask, pooled)
        b, _, h, w = x.shape
        p = self.config.pack
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or of shape ({b},), got {tuple(t.shape)}")
        tokens = pack_latents(x, p)
        kwargs = None
        if self.config.mask_padding and text_mask is not None:
            image = torch.ones(b, tokens.shape[1], dtype=torch.bool, device=x.device)
            # diffusers' joint attention orders the sequence [text; image]; True = attend.
            kwargs = {"attention_mask": torch.cat([text_mask.bool(), image], dim=1)[:, None, None, :]}
        with sdpa_kernel(SDPA_BACKENDS):
            out = self.transformer(
                hidden_states=tokens,
                encoder_hidden_states=text.to(tokens.dtype),
                pooled_projections=pooled.to(tokens.dtype),
                timestep=(1.0 - t).to(tokens.dtype),  # sigma: diffusers' time runs the other way
                img_ids=image_ids(h // p, w // p, x.device),
                txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
                joint_attention_kwargs=kwargs,
                return_dict=False,
            )[0]
        return -unpack_latents(out, p, h, w)  # diffusers predicts noise - data; aligntok data - noise

    # -----------------------------------------------------------------------------------------
    # Persistence: DIR/transformer (diffusers format) + DIR/aligntok_t2i.json
    # -----------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
        """Write ``transformer/`` (diffusers' format) and ``aligntok_t2i.json`` (config, conventions and
        ``extra``, e.g. latent statistics and the text encoder), atomically."""
        from aligntok import __version__

        document = {
            "format": FORMAT_NAME, "aligntok_version": __version__, "config": config_to_dict(self.config),
            "conventions": {"time": "t=0 noise, t=1 data; the transformer gets sigma = 1 - t",
                            "velocity": "data - noise (the transformer's output negated)",
                            "packing": f"{self.config.pack}x{self.config.pack} (FluxPipeline._pack_latents order)"},
            **(extra or {}),
        }

        def write(tmp: Path) -> None:
            self.transformer.save_pretrained(tmp / TRANSFORMER_DIR, safe_serialization=True)
            (tmp / INFO_FILE).write_text(json.dumps(document, indent=2) + "\n")

        return write_directory_atomically(directory, write)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> T2ITransformer:
        """Load a directory written by :meth:`save_pretrained` (weights and conventions)."""
        from diffusers import FluxTransformer2DModel

        document = read_t2i_info(directory)
        config = config_from_dict(T2IConfig, document["config"])
        with torch.device("meta"):  # no time spent initialising weights that are replaced at once
            model = cls(dataclasses.replace(config, gradient_checkpointing=False), initialize=False)
        model.config = config
        model.transformer = FluxTransformer2DModel.from_pretrained(str(Path(directory) / TRANSFORMER_DIR))
        if config.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
        return model.to(device)


def read_t2i_info(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``aligntok_t2i.json`` document of a T2I model directory, or a one-line ValueError."""
    path = Path(directory) / INFO_FILE
    if not path.is_file() or not (Path(directory) / TRANSFORMER_DIR).is_dir():
        raise ValueError(f"not a T2I model directory: {directory} (needs {INFO_FILE} and {TRANSFORMER_DIR}/)")
    return read_json_document(path, FORMAT_NAME, "an aligntok T2I config")


def count_parameters(config: T2IConfig) -> int:
    """Parameters of the transformer ``config`` describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = T2ITransformer(config, initialize=False)
    return sum(p.numel() for p in model.parameters())
