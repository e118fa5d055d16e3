"""The diffusers class-to-image pipeline: aligntok's time grid, the same images as `aligntok sample`, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from aligntok.cli import main
from aligntok.diffusion.samplers import SamplerConfig, timestep_grid
from aligntok.diffusion.sampling import (
    SampleConfig,
    sample_generator,
    sample_to_directory,
)
from aligntok.models.lightningdit import LightningDiT, LightningDiTConfig
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig
from aligntok.pipelines import (
    PIPELINE_MODULE,
    AlignTokClassPipeline,
    flow_match_scheduler,
    flow_match_sigmas,
)

NUM_CLASSES = 3


def tiny_dit(directory) -> LightningDiT:
    torch.manual_seed(0)
    dit = LightningDiT(LightningDiTConfig(input_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES))
    with torch.no_grad():  # the reference init zeroes the output layer: give the model something to say
        for param in dit.parameters():
            param.add_(0.05 * torch.randn_like(param))
    dit.save_pretrained(directory)
    return dit


def tiny_tokenizer(directory) -> AlignTokTokenizer:
    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 8, [1, 2, 2], 4
    torch.manual_seed(1)
    tok = AlignTokTokenizer.from_config(cfg)
    tok.set_latent_stats([0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 1.5])
    tok.save_pretrained(directory)
    return tok


@pytest.mark.parametrize("num_steps", [1, 7, 30, 250])
@pytest.mark.parametrize("shift", [0.3, 0.0, 1.0, 2.0])
def test_the_flow_matching_scheduler_runs_aligntoks_time_grid(num_steps, shift):
    scheduler = flow_match_scheduler(shift)
    scheduler.set_timesteps(sigmas=flow_match_sigmas(num_steps))
    expected = 1.0 - torch.tensor(timestep_grid(num_steps, shift), dtype=torch.float64)  # sigma = 1 - t
    torch.testing.assert_close(scheduler.sigmas.double(), expected, rtol=0, atol=1e-6)


def test_pipeline_images_equal_aligntok_sample(tmp_path):
    tiny_dit(tmp_path / "dit"), tiny_tokenizer(tmp_path / "tok")
    sampler = SamplerConfig(num_steps=30, cfg_scale=3.0)
    sample_to_directory(tmp_path / "dit", tmp_path / "tok", tmp_path / "out", SampleConfig(num=6, seed=7, batch_size=6, sampler=sampler))
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        expected, labels = npz["arr_0"], npz["arr_1"]

    pipe = AlignTokClassPipeline.from_aligntok(tmp_path / "dit", tmp_path / "tok", timestep_shift=sampler.timestep_shift)
    images = pipe(
        class_labels=labels.tolist(), num_inference_steps=30, guidance_scale=3.0,
        guidance_interval=(sampler.cfg_interval_start, sampler.cfg_interval_end),
        generator=[sample_generator(7, i) for i in range(6)], output_type="np",
    ).images
    assert images.shape == expected.shape == (6, 16, 16, 3)
    # The same computation but for the time grid's float32 rounding in the scheduler: at most one level apart.
    difference = np.abs(images.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    with pytest.raises(ValueError, match=r"class_labels must be in 0..2"):
        pipe(class_labels=[3], num_inference_steps=2)


def test_an_exported_pipeline_keeps_the_statistics_the_dit_was_trained_with(tmp_path, caplog):
    dit = tiny_dit(tmp_path / "dit")
    dit.latent_stats = {"mean": [0.3, 0.1, -0.2, 0.4], "std": [1.5, 0.7, 1.2, 0.9]}
    dit.save_pretrained(tmp_path / "dit")
    tiny_tokenizer(tmp_path / "tok")  # other statistics, as after cache-latents was run on it again
    sampler = SamplerConfig(num_steps=8, cfg_scale=1.0)
    sample_to_directory(tmp_path / "dit", tmp_path / "tok", tmp_path / "out", SampleConfig(num=4, seed=3, batch_size=4, sampler=sampler))
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        expected, labels = npz["arr_0"], npz["arr_1"]
    caplog.clear()
    assert main(["export-pipeline", "--dit", str(tmp_path / "dit"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "pipe")]) == 0
    assert "differ from those the DiT was trained with" in caplog.text
    pipe = AlignTokClassPipeline.from_pretrained(tmp_path / "pipe")
    images = pipe(class_labels=labels.tolist(), num_inference_steps=8, guidance_scale=1.0,
                  generator=[sample_generator(3, i) for i in range(4)], output_type="np").images
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_export_saves_a_pipeline_that_diffusers_loads(tmp_path):
    tiny_dit(tmp_path / "dit")
    torch.manual_seed(2)
    AutoencoderKL(
        block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, scaling_factor=0.5,
    ).save_pretrained(tmp_path / "vae")  # a diffusers VAE as the tokenizer: stride 4, 4x4 latents at 16 px
    assert main(["export-pipeline", "--dit", str(tmp_path / "dit"), "--tokenizer", str(tmp_path / "vae"),
                 "--out", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / f"{PIPELINE_MODULE}.py").is_file()

    def run(pipe):
        return pipe(class_labels=[0, 2], num_inference_steps=4, guidance_scale=2.0,
                    generator=[sample_generator(0, i) for i in range(2)], output_type="np").images

    ours = AlignTokClassPipeline.from_pretrained(tmp_path / "pipe")  # no trust_remote_code: nothing foreign runs
    # diffusers' own entry point, with its rule for pipeline classes that live outside diffusers.
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    assert isinstance(theirs, AlignTokClassPipeline)
    np.testing.assert_array_equal(run(ours), run(theirs))
    pil = ours(class_labels=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (16, 16)

    (tmp_path / "pipe" / f"{PIPELINE_MODULE}.py").write_text("import os  # something else\n")
    with pytest.raises(ValueError):  # an edited module file is not trusted on our behalf
        AlignTokClassPipeline.from_pretrained(tmp_path / "pipe")
