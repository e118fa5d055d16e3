"""A diffusers pipeline for text-to-image sampling: the T2I transformer, its text encoders, the tokenizer and a
flow-matching scheduler.

:class:`AlignTokT2IPipeline` is a ``diffusers.DiffusionPipeline`` with the components of FLUX's pipeline:

* ``transformer``: :class:`T2ITransformerModel`, a diffusers ``ModelMixin`` around :class:`T2ITransformer`
  that also holds the model directory's ``aligntok_t2i.json`` (text settings, latent statistics, resolution);
* ``text_encoder`` / ``tokenizer``: the T5 encoder the model was trained with (transformers classes);
* ``text_encoder_2`` / ``tokenizer_2``: the CLIP text model of the pooled vector, or None when the pooled
  vector is T5's masked mean (or zeros);
* ``vae``: :class:`aligntok.pipelines.TokenizerModel`, the image tokenizer;
* ``scheduler``: diffusers' ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting.

Sampling equals ``aligntok sample-t2i`` (Euler) at the same settings, up to float32 rounding of the time grid:
the same guided velocity (:meth:`T2IGenerator.velocity_model`: the prompts and the empty caption encoded in
one batch), the noise of image ``i`` from ``generator[i]`` (pass :func:`aligntok.diffusion.sampling.sample_generator`
``(seed, i)`` for sample-t2i's), and aligntok's grid: the shift ``s`` (given, or FLUX's rule for the token
count, :meth:`T2IGenerator.shift_for`) enters the scheduler as ``mu = -log s`` (its shift ``exp(mu)`` on
sigma = 1 - t is ``s`` on t, see :func:`aligntok.pipelines.flow_match_mu`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from aligntok.config import config_from_dict
from aligntok.diffusion.samplers import SamplerConfig, batched_randn, guided_velocity
from aligntok.diffusion.t2i_sampling import T2IGenerator, text_config_of
from aligntok.models.t2i import T2IConfig, T2ITransformer
from aligntok.models.text import TextConditioner
from aligntok.pipelines import (
    ShimmedPipeline,
    TokenizerModel,
    flow_match_mu,
    flow_match_scheduler,
)

__all__ = ["AlignTokT2IPipeline", "T2ITransformerModel"]


class T2ITransformerModel(ModelMixin, ConfigMixin):
    """A :class:`T2ITransformer` as a diffusers model: ``forward(x, t, text, text_mask, pooled)`` -> velocity
    (aligntok's convention); ``info`` is the model directory's ``aligntok_t2i.json`` document."""

    @register_to_config
    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__()
        self.model = T2ITransformer(config_from_dict(T2IConfig, info["config"]), initialize=False)

    def forward(self, *args: Any) -> torch.Tensor:
        return self.model(*args)


class AlignTokT2IPipeline(ShimmedPipeline):
    """Text-to-image sampling with an aligntok T2I model (see the module doc).

    ``pipe(prompt=[...], num_inference_steps=30, guidance_scale=4.0, height=..., width=..., generator=...)``
    returns ``ImagePipelineOutput(images)``: PIL images (``output_type="pil"``) or uint8 NHWC arrays ("np").
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder_2", "tokenizer_2"]

    def __init__(self, transformer: T2ITransformerModel, text_encoder: Any, tokenizer: Any, vae: TokenizerModel,
                 scheduler: FlowMatchEulerDiscreteScheduler, text_encoder_2: Any = None, tokenizer_2: Any = None) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                              scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    @classmethod
    def from_aligntok(cls, model_dir: str | os.PathLike, tokenizer: str | os.PathLike) -> AlignTokT2IPipeline:
        """From a T2I model directory (``train-t2i``'s RUN/model: weights, text encoders and latent statistics
        as recorded there) and the tokenizer it was trained on. Raises ValueError when they do not fit."""
        from aligntok.models.t2i import read_t2i_info

        generator = T2IGenerator.load(model_dir, tokenizer)
        transformer = T2ITransformerModel(read_t2i_info(model_dir))
        transformer.model.load_state_dict(generator.model.state_dict())
        text = generator.text
        return cls(transformer.eval(), text.encoder, text.tokenizer, TokenizerModel.from_tokenizer(generator.tokenizer),
                   flow_match_scheduler(None), text_encoder_2=text.clip, tokenizer_2=text.clip_tokenizer)

    def _generator(self) -> T2IGenerator:
        info = self.transformer.config.info
        text = TextConditioner(text_config_of(info), models=(self.tokenizer, self.text_encoder, self.tokenizer_2,
                                                             self.text_encoder_2))
        return T2IGenerator(self.transformer.model, self.vae.tokenizer, text, info["latent_mean"], info["latent_std"],
                            info["resolution"])

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        height: int | None = None,
        width: int | None = None,
        timestep_shift: float = 0.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """One image per prompt, ``height`` x ``width`` pixels (default: the training resolution; multiples of
        the tokenizer's stride times the packing).

        ``guidance_scale``: classifier-free guidance against the empty caption, for t in ``guidance_interval``
        (t = 0 noise); ``timestep_shift``: aligntok's s (0: FLUX's rule for the token count, 1: none, as
        sample-t2i's ``--shift``); ``generator``: one, or one per prompt. Raises ValueError (one line) for no
        prompts, a size the model cannot make, or bad sampler settings.
        """
        from aligntok.eval.images import to_uint8_nhwc

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        sampler = SamplerConfig(num_steps=num_inference_steps, cfg_scale=guidance_scale, timestep_shift=timestep_shift,
                                cfg_interval_start=guidance_interval[0], cfg_interval_end=guidance_interval[1])
        sampler.validate()
        model = self._generator()
        rows, cols = model.latent_size(height, width)
        shift = model.shift_for(rows, cols, sampler).timestep_shift
        n = len(prompts)
        velocity_model, rows_of = model.velocity_model(prompts), torch.arange(n, device=model.device)
        x = batched_randn(n, (model.model.config.in_channels, rows, cols), generator, model.device)
        x = self.integrate(x, lambda x, t: guided_velocity(
            velocity_model, x, t, rows_of, cfg_scale=guidance_scale, null_label=n, interval=guidance_interval),
            num_inference_steps, mu=flow_match_mu(shift))
        images = to_uint8_nhwc(model.tokenizer.decode(x * model.std + model.mean))
        return self.output(images, output_type, return_dict)
