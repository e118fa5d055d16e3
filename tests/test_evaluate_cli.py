"""`aligntok evaluate recon|gen|probe`: JSON numbers equal the library's on the same images, exact counts.

Every network is random and saved to disk here (a tiny AlignTok tokenizer, torch-fidelity's
Inception-V3, a torchvision AlexNet trunk for LPIPS, a tiny DINOv2) and reaches the commands through
the same files and flags a user passes. Expected values come from running the library directly on
the images the data layer yields; the 2-process run goes through torchrun with gloo.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from aligntok.cli import main
from aligntok.data import build_dataset, write_shards
from aligntok.eval import (
    LPIPSMetric,
    ReconMetrics,
    average_pool,
    cknna,
    evaluate_probe,
    load_inception,
    save_npz,
    save_png_folder,
)
from aligntok.eval.commands import evaluate_tokenizer_probe
from aligntok.eval.results import write_result
from aligntok.eval.selection import select_images
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

RESOLUTION = 32  # LPIPS' AlexNet trunk needs at least ~32 px
NUM_RECON = 3  # odd: 2 ranks get 2 and 1 images (each Inception forward costs ~0.2 s per image)


# ------------------------------------------------------------------------------------- fixtures


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 8, [1, 2], 4
    path = tmp_path_factory.mktemp("tokenizer") / "tok"
    AlignTokTokenizer.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> Path:
    """A random torchvision AlexNet's `features.*` weights: the file format of the LPIPS trunk."""
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.safetensors"
    save_file(state, path)
    return path


def _dataset_images(spec: str, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = build_dataset(spec, RESOLUTION, builtin_size=num)
    samples = [dataset[i] for i in range(num)]
    return torch.stack([s["image"] for s in samples]), torch.tensor([s["label"] for s in samples])


def _recon_args(tokenizer_dir, inception_file, alexnet_file, out) -> list[str]:
    return [
        "evaluate", "recon", "--tokenizer", str(tokenizer_dir), "--data", "builtin:shapes",
        "--num", str(NUM_RECON), "--resolution", str(RESOLUTION), "--batch-size", "1", "--num-workers", "0",
        "--lpips", "alex", "--lpips-backbone-weights", str(alexnet_file),
        "--inception-weights", str(inception_file), "--out", str(out),
    ]


@pytest.fixture(scope="module")
def single_process_recon_file(tmp_path_factory, tokenizer_dir, inception_file, alexnet_file) -> Path:
    out = tmp_path_factory.mktemp("recon") / "recon.json"
    assert main(_recon_args(tokenizer_dir, inception_file, alexnet_file, out)) == 0
    return out


@pytest.fixture
def single_process_recon(single_process_recon_file) -> dict:
    """The one-process result, parsed afresh for each test (the file is what the module shares)."""
    return json.loads(single_process_recon_file.read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- recon


def test_recon_json_equals_the_library_on_the_same_images(
    single_process_recon, tokenizer_dir, inception_file, alexnet_file
):
    result = single_process_recon
    images, _ = _dataset_images("builtin:shapes", NUM_RECON)
    tok = AlignTokTokenizer.from_pretrained(tokenizer_dir)
    # Batches of one image, as in the command (float32 networks' outputs vary slightly with the batch size).
    batches = [slice(i, i + 1) for i in range(NUM_RECON)]
    with torch.no_grad():
        reconstructions = torch.cat([tok.decode(tok.encode(images[batch])) for batch in batches])
    direct = ReconMetrics(lpips=LPIPSMetric("alex", backbone_weights=alexnet_file), inception=load_inception(inception_file))
    for batch in batches:
        direct.update(images[batch], reconstructions[batch])
    with pytest.warns(UserWarning, match="singular"):  # 3 images in 2048 dims
        expected = direct.compute()

    assert result["num_images"] == NUM_RECON and result["num_skipped"] == 0
    for key in ("psnr", "ssim", "lpips"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    assert result["rfid"] == pytest.approx(expected["rfid"], rel=1e-4) and result["rfid"] > 0
    assert any("singular" in w for w in result["warnings"])
    provenance = result["provenance"]
    assert provenance["num_samples"] == NUM_RECON and provenance["settings"]["world_size"] == 1
    assert result["num_exact_images"] == 0 and "capped at 100 dB" in provenance["settings"]["psnr"]
    networks = {net["name"]: net for net in provenance["feature_networks"]}
    assert networks["aligntok-tokenizer"]["weights_sha256"] == _sha256(tokenizer_dir / "model.safetensors")
    assert networks["inception-v3-compat"]["weights_sha256"] == _sha256(inception_file)
    assert networks["lpips-alex-v0.1"]["weights_sha256"] == _sha256(alexnet_file)
    assert provenance["reference"]["images_selected"] == NUM_RECON and provenance["software"]["torch"]


def test_recon_under_two_processes_gives_the_same_numbers(
    tmp_path, single_process_recon, tokenizer_dir, inception_file, alexnet_file
):
    out = tmp_path / "two.json"
    # Equal PSNR and SSIM mean the ranks evaluated exactly the same images; how LPIPS and rFID combine
    # across ranks is pinned by tests/test_eval_distributed.py. Without their networks each rank starts faster.
    args = _recon_args(tokenizer_dir, inception_file, alexnet_file, out)
    args = args[: args.index("--lpips")] + ["--lpips", "none", "--no-rfid", "--out", str(out)]
    # `--` keeps torchrun from reading our --num as an abbreviation of its --numa-binding.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "aligntok.cli", "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    two = json.loads(out.read_text())
    assert two["num_images"] == NUM_RECON and two["provenance"]["settings"]["world_size"] == 2
    for key in ("psnr", "ssim"):
        assert two[key] == pytest.approx(single_process_recon[key], rel=1e-9), key
    assert two["lpips"] is None and two["rfid"] is None


def _write_folder(root: Path, images_per_class: dict[str, list[np.ndarray]]) -> None:
    for name, images in images_per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{i:03d}.png")


def test_recon_skips_unreadable_images_and_counts_them(tmp_path, tokenizer_dir, capsys):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(5)]
    _write_folder(tmp_path / "data", {"a": images[:3], "b": images[3:]})
    (tmp_path / "data" / "a" / "001.png").write_bytes(b"not a png at all")  # replaces a good one
    out = tmp_path / "r.json"
    args = ["evaluate", "recon", "--tokenizer", str(tokenizer_dir), "--data", str(tmp_path / "data"),
            "--resolution", str(RESOLUTION), "--batch-size", "3", "--num-workers", "0",
            "--no-rfid", "--lpips", "none", "--out", str(out)]
    code, stdout, _ = _run(args, capsys)
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["num_images"], result["num_skipped"]) == (4, 1)
    assert len(result["skipped"]) == 1 and "001.png" in result["skipped"][0]
    assert result["lpips"] is None and result["rfid"] is None
    assert "4 images (1 skipped)" in stdout

    dataset = build_dataset(str(tmp_path / "data"), RESOLUTION)
    good = torch.stack([dataset[i]["image"] for i in (0, 2, 3, 4)])  # the exact ADM-cropped inputs
    tok = AlignTokTokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        metrics = ReconMetrics()
        metrics.update(good, tok.decode(tok.encode(good)))
    expected = metrics.compute()
    assert result["psnr"] == pytest.approx(expected["psnr"], rel=1e-9)
    assert result["ssim"] == pytest.approx(expected["ssim"], rel=1e-9)


def test_selection_is_disjoint_exact_and_rank_independent(tmp_path):
    dataset = build_dataset("builtin:shapes", 16, builtin_size=20)
    whole = select_images(dataset, 7, rank=0, world_size=1, seed=3)
    parts = [select_images(dataset, 7, rank=r, world_size=3, seed=3) for r in range(3)]
    assert whole.keys == parts[0].keys and len(set(whole.keys)) == 7 and whole.keys == sorted(whole.keys)
    assert parts[0].per_rank == [3, 2, 2]
    read = sorted(p.dataset[i]["eval_key"] for p in parts for i in range(len(p.dataset)))
    assert read == whole.keys
    assert select_images(dataset, 7, rank=0, world_size=1, seed=4).keys != whole.keys  # the seed matters
    with pytest.raises(ValueError, match="more than the 20 images"):
        select_images(dataset, 21, rank=0, world_size=1)

    # Shards: one epoch, each sample once over all readers; --num splits it exactly.
    samples = [{"image": np.full((16, 16, 3), 10 * i, np.uint8), "label": i} for i in range(7)]
    write_shards(samples, str(tmp_path / "%06d.tar"), maxcount=3)
    shards = build_dataset(str(tmp_path / "{000000..000002}.tar"), 16)
    for num, expected in ((None, 7), (5, 5)):
        labels = []
        for rank in range(2):
            selection = select_images(shards, num, rank=rank, world_size=2)
            labels += [sample["label"] for sample in selection.dataset]
            assert sum(selection.per_rank) == expected
        assert len(labels) == expected and len(set(labels)) == expected


def test_result_json_is_strict_and_keeps_non_finite_values_readable(tmp_path):
    path = write_result({"psnr": math.inf, "ssim": np.float64(1.0), "nested": {"x": math.nan}}, tmp_path / "r.json")
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: any parser reads it
    assert json.loads(text) == {"psnr": None, "ssim": 1.0, "nested": {"x": None}, "non_finite": {"psnr": "inf"}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no staging file left behind


# ------------------------------------------------------------------------------------- gen


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    path = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(path)
    return path


def test_gen_writes_every_metric_beside_the_samples(tmp_path, inception_file, dinov2_dir, capsys):
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)  # 4 > k=3 of precision/recall
    references = np.clip(rng.integers(60, 200, (4, 1, 1, 3)) + rng.integers(-40, 41, (4, 32, 32, 3)), 0, 255)
    save_npz(samples, tmp_path / "samples.npz")
    save_png_folder(references.astype(np.uint8), tmp_path / "ref")
    args = ["evaluate", "gen", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref"),
            "--inception-weights", str(inception_file), "--dinov2", str(dinov2_dir), "--is-split-size", "4",
            "--batch-size", "4"]
    code, stdout, _ = _run(args, capsys)
    assert code == 0
    result = json.loads((tmp_path / "samples.eval-gen.json").read_text())  # default: beside the input
    for key in ("fid", "inception_score", "precision", "recall", "fd_dinov2"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert "DINOv2" in result["fd_dinov2_note"] and result["num_samples"] == 4
    assert result["provenance"]["feature_networks"][0]["weights_sha256"] == _sha256(inception_file)
    assert "FID" in stdout and "FD_DINOv2" in stdout


# ------------------------------------------------------------------------------------- probe


def _reference_features(dinov2_dir: Path, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The fixed reference encoder's patch tokens on the latent grid, written out: antialiased resize to
    grid * 14 px, ImageNet normalisation, CLS dropped."""
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    pixels = torch.nn.functional.interpolate(images, size=(grid[0] * 14, grid[1] * 14), mode="bilinear",
                                             align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model(pixel_values=((pixels + 1) / 2 - mean) / std).last_hidden_state[:, 1:]
    return tokens.reshape(len(images), grid[0], grid[1], -1).permute(0, 3, 1, 2)


def test_probe_equals_the_library_on_builtin_shapes(tmp_path, tokenizer_dir, dinov2_dir, capsys):
    num = 40
    out = tmp_path / "probe.json"
    args = ["evaluate", "probe", "--tokenizer", str(tokenizer_dir), "--data", "builtin:shapes", "--num", str(num),
            "--resolution", str(RESOLUTION), "--num-workers", "0", "--batch-size", "16", "--cknna-k", "5",
            "--cknna-encoder", str(dinov2_dir), "--out", str(out)]
    code, stdout, _ = _run(args, capsys)
    assert code == 0 and "linear probe" in stdout
    result = json.loads(out.read_text())

    images, labels = _dataset_images("builtin:shapes", num)
    tok = AlignTokTokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        encoder_features, latents = tok.features(images)
    expected = evaluate_probe(latents, labels)
    assert result["linear_probe_accuracy"] == pytest.approx(expected["linear_probe_accuracy"], abs=1e-12)
    assert result["chance_accuracy"] == pytest.approx(expected["chance_accuracy"])
    assert result["num_images"] == num and result["num_classes"] == 10
    # CKNNA against the fixed reference encoder, not against the tokenizer's own encoder.
    reference = _reference_features(dinov2_dir, images, tuple(latents.shape[-2:]))
    expected_cknna = cknna(average_pool(latents), average_pool(reference), k=5)
    assert result["cknna"] == pytest.approx(expected_cknna, rel=1e-5, abs=1e-7)
    own_encoder = cknna(average_pool(latents), average_pool(encoder_features), k=5)
    assert abs(result["cknna"] - own_encoder) > 1e-3
    assert result["provenance"]["settings"]["cknna_encoder"] == str(dinov2_dir)


def test_probe_finds_labels_that_the_latents_carry(tmp_path, tokenizer_dir, capsys):
    """Class = dominant colour: even a random tokenizer's pooled latents separate it; chance is 1/3."""
    rng = np.random.default_rng(2)

    def coloured(count: int) -> dict[str, list[np.ndarray]]:
        classes = {}
        for channel, name in enumerate(("red", "green", "blue")):
            base = np.full(3, 60)
            base[channel] = 200
            classes[name] = [np.clip(base + rng.integers(-50, 51, (32, 32, 3)), 0, 255).astype(np.uint8)
                             for _ in range(count)]
        return classes

    _write_folder(tmp_path / "train", coloured(10))
    _write_folder(tmp_path / "test", coloured(4))
    args = ["evaluate", "probe", "--tokenizer", str(tokenizer_dir), "--data", str(tmp_path / "train"),
            "--test-data", str(tmp_path / "test"), "--resolution", str(RESOLUTION), "--num-workers", "0",
            "--cknna-k", "3", "--out", str(tmp_path / "p.json")]
    assert _run(args, capsys)[0] == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["linear_probe_accuracy"] >= 0.9 and result["chance_accuracy"] == pytest.approx(1 / 3)
    assert (result["num_images"], result["num_test_images"]) == (30, 12)


class _EncoderlessTokenizer(nn.Module):
    """A tokenizer with encode/decode but no foundation encoder (like the VAE baselines)."""

    def __init__(self, inner: AlignTokTokenizer) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.stride, self.latent_channels = inner.stride, inner.latent_channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(z)


def test_probe_of_a_tokenizer_without_foundation_encoder_has_cknna_against_the_reference(tokenizer_dir, dinov2_dir):
    """Baselines have no foundation encoder of their own; CKNNA measures them against the same reference."""
    tok = AlignTokTokenizer.from_pretrained(tokenizer_dir)
    options = {"num": 30, "resolution": RESOLUTION, "num_workers": 0, "cknna_k": 5, "progress": False}
    result = evaluate_tokenizer_probe(_EncoderlessTokenizer(tok), "builtin:shapes", cknna_encoder=str(dinov2_dir),
                                      **options)
    images, labels = _dataset_images("builtin:shapes", 30)
    with torch.no_grad():
        latents = tok.encode(images)
    expected = evaluate_probe(latents, labels)
    assert result["linear_probe_accuracy"] == pytest.approx(expected["linear_probe_accuracy"], abs=1e-12)
    reference = _reference_features(dinov2_dir, images, tuple(latents.shape[-2:]))
    assert result["cknna"] == pytest.approx(cknna(average_pool(latents), average_pool(reference), k=5), rel=1e-5)
    skipped = evaluate_tokenizer_probe(_EncoderlessTokenizer(tok), "builtin:shapes", cknna_encoder=None, **options)
    assert skipped["cknna"] is None and "--cknna-encoder none" in skipped["notes"][0]


# ------------------------------------------------------------------------------------- errors


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and one error line (after any progress bar output), naming what is wrong."""
    assert code == 2, err
    line = err.splitlines()[-1]
    assert "Traceback" not in err and line.startswith("aligntok evaluate: error:"), err
    for needle in needles:
        assert needle in line, (needle, line)


def test_missing_weights_are_one_line_errors_naming_the_file(tmp_path, tokenizer_dir, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache
    base = ["evaluate", "recon", "--tokenizer", str(tokenizer_dir), "--data", "builtin:shapes", "--num", "2",
            "--resolution", str(RESOLUTION), "--num-workers", "0", "--out", str(tmp_path / "x.json")]
    missing = tmp_path / "nope.pth"
    code, _, err = _run([*base, "--lpips", "none", "--inception-weights", str(missing)], capsys)
    _assert_one_line_error(code, err, str(missing), "weights-inception-2015-12-05-6726825d.pth")

    code, _, err = _run([*base, "--lpips", "none", "--offline"], capsys)
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    _assert_one_line_error(code, err, str(cache / "weights-inception-2015-12-05-6726825d.pth"), "--inception-weights")

    code, _, err = _run([*base, "--no-rfid", "--offline"], capsys)  # LPIPS' VGG trunk
    _assert_one_line_error(code, err, str(cache / "vgg16-397923af.pth"))

    save_npz(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "s.npz")
    gen = ["evaluate", "gen", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--offline"]
    code, _, err = _run(gen, capsys)
    _assert_one_line_error(code, err, str(cache / "weights-inception-2015-12-05-6726825d.pth"))
    assert not (tmp_path / "x.json").exists()


def test_bad_inputs_are_one_line_errors(tmp_path, tokenizer_dir, capsys):
    common = ["--resolution", str(RESOLUTION), "--num-workers", "0"]
    code, _, err = _run(["evaluate", "recon", "--tokenizer", "someone/tokenizer", "--data", "builtin:shapes",
                         "--no-rfid", "--lpips", "none", *common], capsys)
    _assert_one_line_error(code, err, "--out")  # a hub id has no "beside": refused before any work

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "flat.png")
    Image.fromarray(np.ones((32, 32, 3), np.uint8)).save(tmp_path / "flat2.png")
    code, _, err = _run(["evaluate", "probe", "--tokenizer", str(tokenizer_dir), "--data", str(tmp_path), *common,
                         "--out", str(tmp_path / "p.json")], capsys)
    _assert_one_line_error(code, err, "labels")

    code, _, err = _run(["evaluate", "recon", "--tokenizer", str(tokenizer_dir), "--data", str(tmp_path),
                         "--num", "3", "--no-rfid", "--lpips", "none", *common, "--out", str(tmp_path / "r.json")],
                        capsys)
    _assert_one_line_error(code, err, "--num 3", "2 images")

    code, _, err = _run(["evaluate", "recon", "--tokenizer", str(tokenizer_dir), "--data", "builtin:shapes",
                         "--num", "2", "--resolution", "33", "--num-workers", "0", "--no-rfid", "--lpips", "none",
                         "--out", str(tmp_path / "r.json")], capsys)
    _assert_one_line_error(code, err, "stride")


def test_an_output_that_cannot_be_written_fails_before_the_evaluation(tmp_path, monkeypatch, capsys):
    import aligntok.eval.commands

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran although its result could not be written")

    monkeypatch.setattr(aligntok.eval.commands, "evaluate_reconstruction", never)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "r.json"  # its folder cannot be made
    assert main(["evaluate", "recon", "--tokenizer", "tok", "--data", "builtin:shapes", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write the result to {out}" in err and "\n" not in err and "re-run" not in err
    # a missing source with no --out names the real problem
    assert main(["evaluate", "gen", "--samples", str(tmp_path / "nope.npz"), "--ref", "x.npz"]) == 2
    assert "nope.npz does not exist" in capsys.readouterr().err
