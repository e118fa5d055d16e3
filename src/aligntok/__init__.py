"""aligntok: pretrained vision foundation encoders aligned into image tokenizers for latent diffusion.

The public API, importable from the top level (``from aligntok import AlignTokTokenizer, LightningDiT``):

Tokenizers (images (B, 3, H, W) float in [-1, 1] <-> latents (B, C, H / stride, W / stride)):
    :class:`LatentTokenizer` (the one interface: ``from_pretrained`` loads any of the following from a
    directory, a hub id ``ORG/NAME[:SUBFOLDER]`` or a diffusers ``AutoencoderKL``), :class:`AlignTokTokenizer`
    (+ :class:`TokenizerConfig`), the baselines' :class:`VAETokenizer` (+ :class:`VAEConfig`),
    :class:`DiffusersVAETokenizer`; :func:`import_vavae_checkpoint` converts a released VA-VAE.
Diffusion: :class:`LightningDiT` (+ :class:`LightningDiTConfig`; ``model(x, t, y)`` -> velocity),
    :func:`import_lightningdit_checkpoint`, :class:`DiTTrainConfig` / :func:`train_dit`,
    :class:`SamplerConfig` / :class:`SampleConfig` / :func:`sample_to_directory` / :func:`generate_images`.
Training the tokenizer: :class:`TokenizerTrainConfig` / :func:`train_tokenizer`.
Data: :func:`build_dataset`, :func:`build_loader`, :func:`cache_latents`, :class:`LatentDataset`.
Evaluation: :func:`evaluate_reconstruction`, :func:`evaluate_generation`, :func:`evaluate_tokenizer_probe`.
diffusers: :class:`AlignTokClassPipeline` (a DiT + tokenizer as a ``DiffusionPipeline``) and
:class:`AlignTokT2IPipeline` (the text-to-image transformer + text encoders + tokenizer).
The Hub: :func:`push_to_hub` (tokenizers and DiTs, with a model card).
Configs and errors: :func:`load_config`, :class:`ConfigError`, :class:`TokenizerNotFoundError`.

Each name is imported on first use, so ``import aligntok`` (and the CLI's ``--help``) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "LatentTokenizer": "aligntok.models.tokenizer",
    "AlignTokTokenizer": "aligntok.models.tokenizer",
    "TokenizerConfig": "aligntok.models.tokenizer",
    "TokenizerNotFoundError": "aligntok.models.tokenizer",
    "VAETokenizer": "aligntok.models.baselines",
    "VAEConfig": "aligntok.models.baselines",
    "DiffusersVAETokenizer": "aligntok.models.diffusers_vae",
    "import_vavae_checkpoint": "aligntok.models.vavae_import",
    "LightningDiT": "aligntok.models.lightningdit",
    "LightningDiTConfig": "aligntok.models.lightningdit",
    "import_lightningdit_checkpoint": "aligntok.models.lightningdit_import",
    "DiTTrainConfig": "aligntok.diffusion.training",
    "train_dit": "aligntok.diffusion.training",
    "SamplerConfig": "aligntok.diffusion.samplers",
    "SampleConfig": "aligntok.diffusion.sampling",
    "sample_to_directory": "aligntok.diffusion.sampling",
    "generate_images": "aligntok.diffusion.sampling",
    "TokenizerTrainConfig": "aligntok.training.stages",
    "train_tokenizer": "aligntok.training.stages",
    "build_dataset": "aligntok.data",
    "build_loader": "aligntok.data",
    "cache_latents": "aligntok.data.latents",
    "LatentDataset": "aligntok.data.latent_dataset",
    "evaluate_reconstruction": "aligntok.eval.commands",
    "evaluate_tokenizer_probe": "aligntok.eval.commands",
    "evaluate_generation": "aligntok.eval.generation",
    "AlignTokClassPipeline": "aligntok.pipelines",
    "AlignTokT2IPipeline": "aligntok.pipelines_t2i",
    "push_to_hub": "aligntok.publish",
    "load_config": "aligntok.config",
    "ConfigError": "aligntok.config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    # Lazy so that `import aligntok` (and the CLI's --help) does not pay for torch + transformers.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aligntok' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
