"""The diffusers text-to-image pipeline: the resolution shift through diffusers' dynamic shifting, the same images
as `aligntok sample-t2i`, export and save/load, one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from aligntok.cli import main
from aligntok.diffusion.samplers import timestep_grid
from aligntok.diffusion.sampling import sample_generator
from aligntok.diffusion.transport import resolution_shift
from aligntok.models.t2i import T2IConfig, T2ITransformer
from aligntok.models.text import TextConditioner, TextConfig, build_tiny_text_encoders
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig
from aligntok.pipelines import (
    PIPELINE_MODULE,
    flow_match_mu,
    flow_match_scheduler,
    flow_match_sigmas,
)
from aligntok.pipelines_t2i import AlignTokT2IPipeline

PROMPTS = ["a red circle", "a blue square left of a green cross", "two red circles"]


def tiny_t2i(root, *, clip: bool):
    """A random f16 tokenizer (8 channels), tiny T5 (+ CLIP) and a tiny T2I model directory at 32 px."""
    cfg = TokenizerConfig(encoder="random", latent_channels=8, adapter_hidden=16)
    cfg.random_encoder.hidden_size, cfg.random_encoder.patch_size, cfg.random_encoder.num_layers = 32, 16, 1
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 4, [1, 1, 1, 1, 1], 4
    cfg.decoder.layers_per_block = 1
    torch.manual_seed(0)
    AlignTokTokenizer.from_config(cfg).save_pretrained(root / "tok")
    words = " ".join(PROMPTS).split()
    paths = build_tiny_text_encoders(root / "text", words, width=16, layers=1, heads=2, clip=clip)
    text = TextConditioner(TextConfig(encoder=str(paths["t5"]), pooled=str(paths["clip"]) if clip else "mean"))
    torch.manual_seed(1)
    model = T2ITransformer(T2IConfig(in_channels=8, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8,
                                     axes_dims_rope=(2, 2, 4), text_dim=16, pooled_dim=16))
    with torch.no_grad():  # the init zeroes the output: give the model something to say
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(root / "model", extra={"latent_mean": [0.1 * i for i in range(8)], "latent_std": [0.5] * 8,
                                                 "text": text.describe(), "resolution": 32})
    return root / "model", root / "tok"


@pytest.mark.parametrize("num_steps", [1, 7, 30])
@pytest.mark.parametrize("tokens", [4, 16, 256, 1024])
def test_the_resolution_shift_enters_diffusers_dynamic_shifting_as_mu(num_steps, tokens):
    scheduler = flow_match_scheduler(None)
    shift = resolution_shift(tokens)
    scheduler.set_timesteps(sigmas=flow_match_sigmas(num_steps), mu=flow_match_mu(shift))
    expected = 1.0 - torch.tensor(timestep_grid(num_steps, shift), dtype=torch.float64)  # sigma = 1 - t
    torch.testing.assert_close(scheduler.sigmas.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip", [False, True])
def test_pipeline_images_equal_sample_t2i(tmp_path, clip):
    model, tok = tiny_t2i(tmp_path, clip=clip)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["sample-t2i", "--model", str(model), "--tokenizer", str(tok), "--prompts", str(tmp_path / "prompts.txt"),
                 "--steps", "5", "--cfg-scale", "3", "--height", "48", "--width", "32", "--seed", "4",
                 "--out", str(tmp_path / "out")]) == 0
    expected = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")) for i in range(3)])

    pipe = AlignTokT2IPipeline.from_aligntok(model, tok)
    images = pipe(prompt=PROMPTS, num_inference_steps=5, guidance_scale=3.0, height=48, width=32,
                  generator=[sample_generator(4, i) for i in range(3)], output_type="np").images
    assert images.shape == expected.shape == (3, 48, 32, 3)
    assert images.std() > 1  # not a flat picture: the comparison means something
    # The same computation but for the time grid's float32 rounding in the scheduler: at most one level apart.
    difference = np.abs(images.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    # The call ran FLUX's shift for its 3x2 tokens (sample-t2i's default) on the scheduler's grid.
    expected_sigmas = 1.0 - torch.tensor(timestep_grid(5, resolution_shift(6)), dtype=torch.float64)
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), expected_sigmas, rtol=0, atol=1e-6)
    pipe(prompt=PROMPTS[0], num_inference_steps=5, height=48, width=32, timestep_shift=1.0, output_type="np")
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), torch.linspace(1, 0, 6, dtype=torch.float64), rtol=0, atol=1e-6)


def test_export_saves_a_t2i_pipeline_that_diffusers_loads(tmp_path):
    model, tok = tiny_t2i(tmp_path, clip=True)
    assert main(["export-pipeline", "--dit", str(model), "--tokenizer", str(tok), "--out", str(tmp_path / "pipe")]) == 0
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == [PIPELINE_MODULE, "AlignTokT2IPipeline"]
    assert {"transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler"} <= set(index)

    def run(pipe):
        return pipe(prompt=PROMPTS[:2], num_inference_steps=3, guidance_scale=2.0,
                    generator=[sample_generator(0, i) for i in range(2)], output_type="np").images

    original = AlignTokT2IPipeline.from_aligntok(model, tok)
    ours = AlignTokT2IPipeline.from_pretrained(tmp_path / "pipe")  # no trust_remote_code: nothing foreign runs
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    assert isinstance(theirs, AlignTokT2IPipeline)
    np.testing.assert_array_equal(run(original), run(ours))
    np.testing.assert_array_equal(run(ours), run(theirs))
    pil = ours(prompt="a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (32, 32)  # the training resolution by default


def test_push_a_t2i_pipeline_as_a_diffusers_repository(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    uploaded = tmp_path / "uploaded"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):  # the Hub's upload recorded, not sent
        shutil.copytree(folder_path, uploaded)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model, tok = tiny_t2i(tmp_path, clip=False)
    assert main(["export-pipeline", "--model", str(model), "--tokenizer", str(tok), "--out", str(tmp_path / "pipe")]) == 0
    assert main(["push-to-hub", str(tmp_path / "pipe"), "me/t2i", "--dataset", "laion/relaion2B-en-research-safe"]) == 0
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.library_name == "diffusers" and {"aligntok", "text-to-image"} <= set(card.data.tags)
    assert "# AlignTok text-to-image pipeline" in card.text and "Trained at 32 px" in card.text
    assert isinstance(AlignTokT2IPipeline.from_pretrained(uploaded), AlignTokT2IPipeline)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    model, tok = tiny_t2i(tmp_path, clip=False)
    pipe = AlignTokT2IPipeline.from_aligntok(model, tok)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        pipe(prompt=[], num_inference_steps=2)
    with pytest.raises(ValueError, match="multiples of 16 px, got 40x32"):
        pipe(prompt=PROMPTS, num_inference_steps=2, height=40, width=32)
    capsys.readouterr()
    code = main(["export-pipeline", "--model", str(model), "--tokenizer", str(tok), "--shift", "0.5",
                 "--out", str(tmp_path / "pipe")])
    err = capsys.readouterr().err
    assert code == 2 and "--shift" in err and len(err.strip().splitlines()) == 1
