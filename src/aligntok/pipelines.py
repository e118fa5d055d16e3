"""A diffusers pipeline for class-to-image sampling: a LightningDiT, its tokenizer and a flow-matching scheduler.

:class:`AlignTokClassPipeline` is a ``diffusers.DiffusionPipeline`` with three components:

* ``transformer``: :class:`LightningDiTTransformer`, a diffusers ``ModelMixin`` around :class:`LightningDiT`;
* ``vae``: :class:`TokenizerModel`, a ``ModelMixin`` around any aligntok tokenizer (AlignTok, the baselines,
  a wrapped ``AutoencoderKL``), holding the latent statistics the samples are de-normalised with;
* ``scheduler``: diffusers' ``FlowMatchEulerDiscreteScheduler``.

Build it with :meth:`AlignTokClassPipeline.from_aligntok` from a DiT and a tokenizer; ``save_pretrained`` /
``from_pretrained`` as any pipeline (diffusers finds the components' classes in this module, which
``from aligntok.pipelines import AlignTokClassPipeline`` has imported).

Sampling equals ``aligntok sample`` with the Euler method at the same settings (up to float32 rounding of the
time grid): the noise of sample ``i`` comes from ``generator[i]`` (pass
:func:`aligntok.diffusion.sampling.sample_generator` ``(seed, i)`` to get exactly ``aligntok sample``'s), the
velocity is aligntok's guided velocity (guidance interval included), and the scheduler runs aligntok's time
grid: diffusers' sigma is ``1 - t``, and its shift ``S`` on sigma is aligntok's shift ``s`` on t when
``S = 1 / s``, given the uniform grid as explicit sigmas (the scheduler's default grid ends at ``1 / 1000``
instead of 0).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    ModelMixin,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config

from aligntok.config import config_from_dict, config_to_dict
from aligntok.diffusion.samplers import batched_randn, guided_velocity
from aligntok.diffusion.sampling import latent_statistics
from aligntok.models.lightningdit import LightningDiT, LightningDiTConfig
from aligntok.models.tokenizer import ALIGNTOK_METHOD, LatentTokenizer, tokenizer_class

PIPELINE_MODULE = "aligntok_pipeline"  # the module file save_pretrained writes beside model_index.json

__all__ = ["AlignTokClassPipeline", "LightningDiTTransformer", "ShimmedPipeline", "TokenizerModel", "flow_match_mu", "flow_match_scheduler", "flow_match_sigmas"]


class LightningDiTTransformer(ModelMixin, ConfigMixin):
    """A :class:`LightningDiT` as a diffusers model: ``forward(x, t, y)`` -> velocity (aligntok's convention,
    t = 0 noise, 1 = data); ``dit_config`` holds the :class:`LightningDiTConfig` fields."""

    @register_to_config
    def __init__(self, dit_config: dict[str, Any]) -> None:
        super().__init__()
        self.dit = LightningDiT(config_from_dict(LightningDiTConfig, dit_config))

    @classmethod
    def from_lightningdit(cls, model: LightningDiT) -> LightningDiTTransformer:
        wrapper = cls(config_to_dict(model.config))
        wrapper.dit.load_state_dict(model.state_dict())
        return wrapper.eval()  # train mode would drop labels (classifier-free guidance training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, y)


class TokenizerModel(ModelMixin, ConfigMixin):
    """An aligntok tokenizer as a diffusers model; ``document`` is its aligntok config.json (latent statistics
    included)."""

    @register_to_config
    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__()
        self.tokenizer = tokenizer_class(document.get("method", ALIGNTOK_METHOD))._from_document(document)

    @classmethod
    def from_tokenizer(cls, tokenizer: LatentTokenizer, latent_stats: tuple[list[float], list[float]] | None = None) -> TokenizerModel:
        """A copy of ``tokenizer``; ``latent_stats`` (mean, std) replace its statistics in the copy's config, which
        is what ``save_pretrained`` writes."""
        document = tokenizer._config_document()
        if latent_stats is not None:
            mean, std = latent_stats
            document = {**document, "tokenizer": {**document["tokenizer"], "latent_mean": list(mean), "latent_std": list(std)}}
        wrapper = cls(document)
        wrapper.tokenizer.load_state_dict(tokenizer.state_dict())
        return wrapper.eval()


def flow_match_sigmas(num_steps: int) -> np.ndarray:
    """aligntok's uniform grid as diffusers sigmas (1 - t), without the terminal 0 the scheduler appends."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1]


def flow_match_scheduler(timestep_shift: float | None) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler whose shift on sigma equals aligntok's ``timestep_shift`` s on t (s = 0 or 1: none).

    ``None``: a shift chosen per call (``set_timesteps(..., mu=flow_match_mu(s))``, diffusers' dynamic
    shifting as FLUX's pipeline uses it), for text-to-image's shift that depends on the image size.
    """
    if timestep_shift is None:
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return FlowMatchEulerDiscreteScheduler(shift=1.0 / timestep_shift if timestep_shift > 0 else 1.0)


def flow_match_mu(timestep_shift: float) -> float:
    """diffusers' ``mu`` for aligntok's shift s: its dynamic shift exp(mu) on sigma is the static shift 1 / s."""
    return -math.log(timestep_shift) if timestep_shift > 0 else 0.0


class ShimmedPipeline(DiffusionPipeline):
    """An aligntok pipeline class that saves a one-line module beside its components, so that diffusers'
    own ``DiffusionPipeline.from_pretrained`` can find a class that lives outside diffusers."""

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' save_pretrained, plus a one-line module naming this class, so that
        ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` finds it (diffusers' rule for any
        pipeline class outside diffusers; the module only imports the installed aligntok)."""
        super().save_pretrained(save_directory, **kwargs)
        directory = Path(save_directory)
        (directory / f"{PIPELINE_MODULE}.py").write_text(_module_text(type(self)))
        index_path = directory / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DiffusionPipeline:
        """Load a directory (or hub id ``ORG/NAME[:SUBFOLDER]``) written by :meth:`save_pretrained`.

        Its module file is checked to be exactly the one-line import save_pretrained writes, so loading
        through this class runs no code from the directory and needs no ``trust_remote_code``.
        """
        from aligntok.hub import resolve_directory

        directory = resolve_directory(str(pretrained_model_name_or_path), what="pipeline", error=ValueError)
        module = directory / f"{PIPELINE_MODULE}.py"
        if module.is_file() and module.read_text() == _module_text(cls):
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(directory, **kwargs)

    def integrate(self, x: torch.Tensor, velocity: Any, num_inference_steps: int, mu: float | None = None) -> torch.Tensor:
        """Euler from noise ``x`` to data with the scheduler on aligntok's uniform grid (shifted by the
        scheduler's shift, or by ``mu`` when it shifts dynamically); ``velocity(x, t)`` in aligntok's convention."""
        self.scheduler.set_timesteps(sigmas=flow_match_sigmas(num_inference_steps), device=x.device, mu=mu)
        for index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            t = 1.0 - float(self.scheduler.sigmas[index])
            x = self.scheduler.step(-velocity(x, t), timestep, x).prev_sample  # d x / d sigma = -v, as sigma = 1 - t
        return x

    @staticmethod
    def output(images: np.ndarray, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """uint8 NHWC ``images`` as PIL images (``output_type="pil"``) or the array ("np")."""
        if output_type == "pil":
            images = _to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class AlignTokClassPipeline(ShimmedPipeline):
    """Class-conditional sampling with a LightningDiT and its tokenizer (see the module doc).

    ``pipe(class_labels=[...], num_inference_steps=250, guidance_scale=4.0, generator=...)`` returns
    ``ImagePipelineOutput(images)``: PIL images (``output_type="pil"``) or uint8 NHWC arrays ("np").
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: LightningDiTTransformer, vae: TokenizerModel, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @classmethod
    def from_aligntok(cls, dit: Any, tokenizer: Any, *, timestep_shift: float = 0.3) -> AlignTokClassPipeline:
        """From a LightningDiT and the tokenizer it was trained on (models, directories or hub ids).

        The samples are de-normalised with the statistics the DiT records, else the tokenizer's (kept in the
        pipeline's tokenizer); ``timestep_shift`` is aligntok's (0.3).
        Raises ValueError when they do not fit together or the tokenizer has no statistics.
        """
        dit = dit if isinstance(dit, LightningDiT) else LightningDiT.from_pretrained(dit)
        tok = tokenizer if isinstance(tokenizer, LatentTokenizer) else LatentTokenizer.from_pretrained(tokenizer)
        if dit.config.in_channels != tok.latent_channels:
            raise ValueError(f"the DiT makes {dit.config.in_channels}-channel latents, the tokenizer has {tok.latent_channels}")
        # De-normalised as `aligntok sample` does: with the statistics the DiT was trained with when it records
        # them (a warning when the tokenizer's differ), written into the pipeline's tokenizer config.
        mean, std, _ = latent_statistics(dit, tok)
        vae = TokenizerModel.from_tokenizer(tok, latent_stats=(mean, std))
        return cls(LightningDiTTransformer.from_lightningdit(dit), vae, flow_match_scheduler(timestep_shift))

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int],
        num_inference_steps: int = 250,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.10, 1.0),
        guidance_channels: int | str | None = "recorded",
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per class label.

        ``guidance_interval``: guidance only for t in it (t = 0 noise); ``guidance_channels``: guide only the
        first N latent channels (None: all; "recorded": the DiT's recorded ``cfg_channels``, e.g. 3 for an
        imported reference checkpoint, as its ``forward_with_cfg``); ``generator``: one, or one per image
        (image ``i``'s noise from ``generator[i]`` alone, as ``aligntok sample``). Raises ValueError for
        labels outside the model's classes.
        """
        from aligntok.eval.images import to_uint8_nhwc

        dit: LightningDiT = self.transformer.dit
        tok: LatentTokenizer = self.vae.tokenizer
        labels = torch.tensor([class_labels] if isinstance(class_labels, int) else list(class_labels), dtype=torch.long)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= dit.num_classes:
            raise ValueError(f"class_labels must be in 0..{dit.num_classes - 1}, got {labels.tolist()}")
        device = self._execution_device
        labels = labels.to(device)
        shape = (dit.config.in_channels, dit.config.input_size, dit.config.input_size)
        x = batched_randn(len(labels), shape, generator, device)
        if guidance_channels == "recorded":
            guidance_channels = (dit.sampler_settings or {}).get("cfg_channels")

        x = self.integrate(x, lambda x, t: guided_velocity(
            dit, x, t, labels, cfg_scale=guidance_scale, null_label=dit.null_label, interval=guidance_interval,
            channels=guidance_channels), num_inference_steps)
        return self.output(to_uint8_nhwc(tok.decode(tok.denormalize_latents(x))), output_type, return_dict)


def _module_text(cls: type) -> str:
    return f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n"


def _to_pil(images: np.ndarray) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(image) for image in images]
