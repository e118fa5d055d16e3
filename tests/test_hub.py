"""The Hub without a network: push_to_hub's card and folder, and hub ids loading offline from the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from huggingface_hub import HfApi, ModelCard

from aligntok import push_to_hub
from aligntok.cli import main
from aligntok.models.diffusers_vae import DiffusersVAETokenizer
from aligntok.models.lightningdit import LightningDiT, LightningDiTConfig
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """HfApi's create_repo and upload_folder replaced by a recorder; each upload's folder is copied aside."""
    calls: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append({"create": repo_id, **kwargs})

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / "uploaded" / f"{len(calls)}"
        shutil.copytree(folder_path, copy)
        calls.append({"upload": repo_id, "folder": copy, **kwargs})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def tiny_dit() -> LightningDiT:
    torch.manual_seed(0)
    return LightningDiT(LightningDiTConfig(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3))


def tiny_tokenizer() -> AlignTokTokenizer:
    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 8, [1, 2, 2], 4
    torch.manual_seed(0)
    return AlignTokTokenizer.from_config(cfg)


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(5)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()


def test_push_a_dit_run_with_its_config_and_metrics(tmp_path, hub, capsys):
    run = tmp_path / "run"
    tiny_dit().save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 2}, "optim": {"lr": 0.001}}))
    metrics = tmp_path / "samples.eval-gen.json"
    metrics.write_text(json.dumps({"fid": 12.5, "is": 80.25, "num_samples": 50, "notes": ["x"]}))
    assert main(["push-to-hub", str(run / "model"), "me/tiny-dit", "--dataset", "ILSVRC/imagenet-1k",
                 "--metrics", str(metrics), "--base-model", "me/tiny-tokenizer", "--private"]) == 0
    assert "https://huggingface.co/me/tiny-dit/commit/abc" in capsys.readouterr().out
    assert hub[0] == {"create": "me/tiny-dit", "private": True, "exist_ok": True}
    folder = hub[1]["folder"]
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == {"config.json", "model.safetensors", "README.md", "training_config.yaml", "eval/samples.eval-gen.json"}
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "aligntok" and data["license"] == "apache-2.0"
    assert {"aligntok", "lightningdit"} <= set(data["tags"])
    assert data["datasets"] == ["ILSVRC/imagenet-1k"] and data["base_model"] == "me/tiny-tokenizer"
    indexed = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert indexed == {"fid": 12.5, "is": 80.25}
    assert "| samples.eval-gen | fid | 12.5 |" in card.text and "lr: 0.001" in card.text
    assert yaml.safe_load((folder / "training_config.yaml").read_text())["train"]["steps"] == 2
    assert LightningDiT.from_pretrained(folder).config == tiny_dit().config


def test_push_finds_a_tokenizer_stages_config_and_evaluations_beside_it(tmp_path, hub):
    run = tmp_path / "run"
    tiny_tokenizer().save_pretrained(run / "stage3")
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "aligntok"}))
    (run / "stage3.eval-recon.json").write_text(json.dumps({"psnr": 25.5, "rfid": 1.5}))
    push_to_hub(run / "stage3", "me/tok")
    folder = hub[1]["folder"]
    card = ModelCard.load(folder / "README.md")
    assert {"aligntok", "image-tokenizer"} <= set(card.data.tags) and card.data.license == "apache-2.0"
    assert "model-index" not in card.data.to_dict()  # no dataset named: the metrics stay in the text
    assert "# AlignTok image tokenizer" in card.text and "| stage3.eval-recon | psnr | 25.5 |" in card.text
    assert (folder / "eval" / "stage3.eval-recon.json").is_file() and (folder / "training_config.yaml").is_file()
    assert isinstance(AlignTokTokenizer.from_pretrained(folder), AlignTokTokenizer)


def test_a_wrapped_diffusers_vae_names_its_source_and_claims_no_license(tmp_path, hub):
    tiny_vae().save_pretrained(tmp_path / "vae")
    tok = DiffusersVAETokenizer.from_diffusers(tmp_path / "vae", source="black-forest-labs/FLUX.1-schnell:vae")
    push_to_hub(tok, "me/flux-vae-tokenizer", tags=["flux"])
    data = ModelCard.load(hub[1]["folder"] / "README.md").data
    assert data.base_model == "black-forest-labs/FLUX.1-schnell" and data.license is None
    assert {"diffusers-vae", "flux"} <= set(data.tags)


def test_push_a_class_to_image_pipeline_as_a_diffusers_repository(tmp_path, hub):
    from aligntok.pipelines import AlignTokClassPipeline

    tok = tiny_tokenizer()
    tok.set_latent_stats([0.0] * 4, [1.0] * 4)
    (tmp_path / "pipe.eval-gen.json").write_text(json.dumps({"fid": 3.5}))
    AlignTokClassPipeline.from_aligntok(tiny_dit(), tok).save_pretrained(tmp_path / "pipe")
    push_to_hub(tmp_path / "pipe", "me/pipe", datasets=["ILSVRC/imagenet-1k"])
    folder = hub[1]["folder"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    assert {"aligntok", "lightningdit"} <= set(card.data.tags) and "trust_remote_code=True" in card.text
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 3.5
    assert {"model_index.json", "aligntok_pipeline.py", "transformer", "vae", "scheduler", "eval"} <= {p.name for p in folder.iterdir()}
    assert isinstance(AlignTokClassPipeline.from_pretrained(folder), AlignTokClassPipeline)


def test_pushing_something_else_is_a_one_line_error(tmp_path, hub, capsys):
    (tmp_path / "x").mkdir()
    assert main(["push-to-hub", str(tmp_path / "x"), "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a saved aligntok tokenizer, LightningDiT or AlignTokClassPipeline" in err and "\n" not in err
    assert hub == []


def test_an_unreachable_hub_is_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import errors

    if not isinstance(getattr(errors, "HTTPError", None), type):
        pytest.skip("this huggingface_hub has no HTTP client error base to raise")

    class NoNetwork(errors.HTTPError):  # what the hub's HTTP client raises without a network (not an OSError)
        pass

    def create_repo(self, *args, **kwargs):
        raise NoNetwork("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    tiny_dit().save_pretrained(tmp_path / "model")
    assert main(["push-to-hub", str(tmp_path / "model"), "me/tiny-dit"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot reach the Hugging Face Hub to push me/tiny-dit" in err and "Name or service" in err
    assert "\n" not in err and "Traceback" not in err


def fake_hub_cache(hf_home: Path, repo_id: str, folder: Path, subfolder: str = "") -> None:
    """The Hugging Face cache layout (hub/models--ORG--NAME/{refs/main, snapshots/COMMIT/...}) holding ``folder``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit / subfolder)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_load_offline_from_the_local_cache(tmp_path, hub):
    """A diffusers VAE inside a pipeline repo (ORG/NAME:vae), and a pushed tokenizer and DiT, by id, offline."""
    vae, dit, tok = tiny_vae(), tiny_dit(), tiny_tokenizer()
    vae.save_pretrained(tmp_path / "vae")
    fake_hub_cache(tmp_path / "hf", "tiny-org/tiny-flux", tmp_path / "vae", "vae")
    push_to_hub(dit, "me/dit")
    push_to_hub(tok, "me/tok")
    fake_hub_cache(tmp_path / "hf", "me/dit", hub[1]["folder"])
    fake_hub_cache(tmp_path / "hf", "me/tok", hub[3]["folder"])
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    script = """
import sys, torch
from aligntok import AlignTokTokenizer, LightningDiT
x = torch.load(sys.argv[1])
vae = AlignTokTokenizer.from_pretrained('tiny-org/tiny-flux:vae')
tok = AlignTokTokenizer.from_pretrained('me/tok')
dit = LightningDiT.from_pretrained('me/dit')
z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = {'vae': vae.encode(x), 'mean': vae.config.latent_mean, 'tok': tok.encode(x),
           'dit': dit(z, torch.full((2,), 0.5), torch.tensor([0, 2]))}
torch.save(out, sys.argv[2])
AlignTokTokenizer.from_pretrained('tiny-org/tiny-flux:transformer')
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "has no folder 'transformer'" in done.stderr.strip().splitlines()[-1]  # a missing subfolder is named
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(out["vae"], vae.encode(x).latent_dist.mean)
        torch.testing.assert_close(out["tok"], tok.encode(x))
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out["dit"], dit(z, torch.full((2,), 0.5), torch.tensor([0, 2])))
    assert out["mean"] == pytest.approx([0.1159] * 4)  # FLUX-style shift_factor from the VAE config
