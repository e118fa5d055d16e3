"""The README's "Coming from diffusers" commands run as written, offline, on tiny stand-ins of the Hub VAEs.

The Hub ids they name are tiny AutoencoderKLs laid out in a Hugging Face cache (HF_HUB_OFFLINE=1); the
ImageNet paths become the built-in dataset; options appended to each command (argparse and the config
overrides let the last value win) shrink the run: fewer images and steps, a one-block DiT.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from huggingface_hub import ModelCard

ROOT = Path(__file__).resolve().parents[1]
DATA = {"/data/imagenet/val": "builtin:shapes", "/data/imagenet/train": "builtin:shapes"}
SHRINK = {
    "evaluate": ["--num", "4", "--batch-size", "4", "--num-workers", "0", "--lpips", "none", "--no-rfid"],
    "cache-latents": ["--builtin-size", "8", "--batch-size", "8", "--num-workers", "0"],
    "train-dit": ["preset=", "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=2",
                  "train.steps=2", "train.batch_size=4", "train.precision=fp32",
                  "train.ckpt_every=2", "data.num_workers=0"],
    "sample": ["--num", "4", "--steps", "2", "--batch-size", "4"],
    "push-to-hub": [],
    "export-pipeline": [],
}
# Runs the commands in one process (one import of torch and diffusers), the Hub upload recorded, not sent.
RUNNER = """
import json, shutil, sys
from huggingface_hub import HfApi
from aligntok.cli import main
HfApi.create_repo = lambda self, repo_id, **kw: None
def upload_folder(self, *, repo_id, folder_path, **kw):
    shutil.copytree(folder_path, "uploaded")
    return "https://huggingface.co/" + repo_id
HfApi.upload_folder = upload_folder
for argv in json.load(open(sys.argv[1])):
    code = main(argv)
    if code:
        sys.exit(f"exit {code}: aligntok {' '.join(argv)}")
"""


def readme_commands() -> list[list[str]]:
    """The `aligntok ...` lines of the section's first bash block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Coming from diffusers") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("aligntok ")]


def tiny_vae(latent_channels: int, seed: int, **config) -> AutoencoderKL:
    """Stride 8 as SD's and FLUX's VAEs, a few thousand weights."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels, norm_num_groups=4,
        layers_per_block=1, **config,
    )


def cache_repo(hf_home: Path, repo_id: str, vae: AutoencoderKL, subfolder: str = "") -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    vae.save_pretrained(repo / "snapshots" / commit / subfolder)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_the_coming_from_diffusers_commands_run(tmp_path):
    commands = readme_commands()
    assert [c[0] for c in commands] == ["evaluate", "cache-latents", "train-dit", "sample", "push-to-hub", "export-pipeline"]
    hf_home = tmp_path / "hf"
    cache_repo(hf_home, "stabilityai/sd-vae-ft-ema", tiny_vae(4, 0))
    cache_repo(hf_home, "black-forest-labs/FLUX.1-schnell", tiny_vae(16, 1, scaling_factor=0.3611, shift_factor=0.1159), "vae")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    runs = [[DATA.get(arg, arg) for arg in argv] + SHRINK[argv[0]] for argv in commands]
    (tmp_path / "commands.json").write_text(json.dumps(runs))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUNNER, "commands.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    assert json.loads((tmp_path / "flux-vae.eval-recon.json").read_text())["num_images"] == 4
    copy = json.loads((tmp_path / "latents" / "sdvae" / "tokenizer" / "config.json").read_text())
    assert copy["method"] == "diffusers-vae" and len(copy["tokenizer"]["latent_mean"]) == 4
    with __import__("numpy").load(tmp_path / "samples" / "sdvae" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (4, 256, 256, 3)
    card = ModelCard.load(tmp_path / "uploaded" / "README.md").data
    assert card.base_model == "stabilityai/sd-vae-ft-ema" and card.datasets == ["ILSVRC/imagenet-1k"]
    index = json.loads((tmp_path / "pipelines" / "sdvae" / "model_index.json").read_text())
    assert set(index) >= {"transformer", "vae", "scheduler"}
