"""Baseline tokenizers (plain VAE, VA-VAE style): stage tables, losses, training, save/load, frozen teacher."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from aligntok.cli import main
from aligntok.config import ConfigError, load_config
from aligntok.losses.reconstruction import ReconstructionLoss
from aligntok.losses.vf import (
    VFLoss,
    VFLossConfig,
    marginal_cosine_loss,
    marginal_distance_matrix_loss,
)
from aligntok.models.baselines import (
    VAEConfig,
    VAETokenizer,
    diagonal_gaussian_kl,
    sample_posterior,
)
from aligntok.models.encoders import RandomEncoderConfig, build_random_encoder
from aligntok.models.tokenizer import (
    AlignTokTokenizer,
    LatentTokenizer,
    TokenizerNotFoundError,
)
from aligntok.training.stages import (
    METHOD_STAGES,
    STAGES,
    TokenizerStageTask,
    TokenizerTrainConfig,
    build_stage_tokenizer,
    build_tokenizer,
    build_vf_loss,
    train_tokenizer,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"
TINY = {"aligntok": CONFIGS / "tiny.yaml", "vae": CONFIGS / "vae_tiny.yaml", "vavae": CONFIGS / "vavae_tiny.yaml"}

# Smaller than the shipped tiny configs so that a baseline trains in about a second.
FAST = [
    "data.resolution=32",
    "data.num_workers=0",
    "model.decoder.base_channels=8",
    "model.decoder.channel_mult=[1,2,2,2]",
    "model.decoder.norm_groups=4",
    "model.latent_channels=4",
    "loss.gan_start=2",
    "stage1.train.steps=4",
    "stage1.train.batch_size=4",
    "stage1.train.ckpt_every=2",
    "stage1.train.log_every=1",
]


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def fast_config(method: str, *extra: str) -> TokenizerTrainConfig:
    return load_config(TokenizerTrainConfig, TINY[method], [*FAST, *extra])


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "stage1" / "log.jsonl").read_text().splitlines()]


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """The plain VAE trained through train_tokenizer, the VA-VAE through the CLI; initial weights kept.

    Trained once per module; tests get copies through :func:`runs`.
    """
    out = {}
    for method in ("vae", "vavae"):
        cfg = fast_config(method)
        run_dir = tmp_path_factory.mktemp(method)
        initial = build_stage_tokenizer(cfg, run_dir, cfg.stages[1])
        if method == "vae":
            assert train_tokenizer(cfg, run_dir) == {1: run_dir / "stage1"}
        else:
            assert main(["train-tokenizer", str(TINY[method]), "--out", str(run_dir), *FAST]) == 0
        out[method] = (cfg, run_dir, state(initial))
    return out


@pytest.fixture
def runs(trained_runs):
    """Per method: (config, run directory, initial weights), copies a test may change freely."""
    return {method: copy.deepcopy((cfg, run_dir, initial)) for method, (cfg, run_dir, initial) in trained_runs.items()}


# ------------------------------------------------------------------------------------------ stage tables


def test_stage_tables_give_each_baseline_one_stage_training_everything():
    assert METHOD_STAGES["aligntok"] is STAGES and len(STAGES) == 3
    for method, vf in (("vae", False), ("vavae", True)):
        (stage,) = METHOD_STAGES[method].values()
        assert stage.number == 1 and stage.starts_from is None and not stage.keeps_ema
        assert stage.trains == set(VAETokenizer.parts) == {"encoder", "decoder"}
        assert stage.kl_loss and stage.vf_loss == vf and not stage.semantic_loss
    assert not any(s.kl_loss or s.vf_loss for s in STAGES.values())


def test_baseline_matches_aligntok_decoder_and_latent_shape():
    aligntok = build_tokenizer(load_config(TokenizerTrainConfig, TINY["aligntok"]))
    for method in ("vae", "vavae"):
        vae = build_tokenizer(load_config(TokenizerTrainConfig, TINY[method]))
        assert isinstance(vae, VAETokenizer) and vae.config.trained_with == method
        shapes = {k: v.shape for k, v in vae.decoder.state_dict().items()}
        assert shapes == {k: v.shape for k, v in aligntok.decoder.state_dict().items()}
        x = images(size=64)
        with torch.no_grad():
            assert vae.encode(x).shape == aligntok.encode(x).shape == (2, 16, 4, 4)


def test_tiny_configs_share_aligntok_tiny_data_loss_and_step_budget():
    aligntok = load_config(TokenizerTrainConfig, TINY["aligntok"])
    budget = sum(aligntok.stage(n).train.steps * aligntok.stage(n).train.batch_size for n in STAGES)
    for method in ("vae", "vavae"):
        cfg = load_config(TokenizerTrainConfig, TINY[method])
        assert cfg.method == method
        assert cfg.stage1.train.steps * cfg.stage1.train.batch_size == budget  # 480 steps at batch 16
        assert (cfg.model, cfg.data, cfg.loss) == (aligntok.model, aligntok.data, aligntok.loss)


def test_config_errors_are_one_line(tmp_path):
    for method, override, needle in [
        ("vae", "method=vqgan", "method='vqgan'"),
        ("vavae", "vf.cos_margin=3", "cos_margin=3"),
        ("vae", "kl.weight=-1", "weight=-1"),
    ]:
        with pytest.raises(ConfigError) as err:
            fast_config(method, override)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="has stage\\(s\\) 1 only; there is no stage 2"):
        train_tokenizer(fast_config("vae"), tmp_path, stages=(2,))


def test_cli_stage_2_of_a_baseline_is_a_one_line_error(tmp_path, capsys):
    assert main(["train-tokenizer", str(TINY["vae"]), "--out", str(tmp_path / "run"), "--stage", "2", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "no stage 2" in err and "\n" not in err


# ------------------------------------------------------------------------------------------ training runs


def test_each_baseline_trains_encoder_and_decoder_into_stage1(runs):
    for method, (cfg, run_dir, initial) in runs.items():
        assert (run_dir / "stage1" / "config.json").is_file() and not (run_dir / "stage2").exists()
        tok = AlignTokTokenizer.from_pretrained(run_dir / "stage1")
        assert isinstance(tok, VAETokenizer) and tok.config.trained_with == method
        trained = state(tok)
        for part in ("encoder", "decoder"):
            keys = [k for k in initial if k.startswith(part + ".")]
            assert keys and any(not torch.equal(initial[k], trained[k]) for k in keys), (method, part)
        card = (run_dir / "stage1" / "README.md").read_text()
        assert f"baseline tokenizer ({method})" in card and f"| method | {method} |" in card


def test_reconstruct_command_takes_a_baseline(runs, tmp_path):
    _, run_dir, _ = runs["vae"]
    args = ["reconstruct", str(run_dir / "stage1"), "builtin:shapes", "--out", str(tmp_path), "--num", "2"]
    assert main([*args, "--resolution", "32"]) == 0
    assert len(list(tmp_path.glob("*_recon.png"))) == 2


def test_configured_losses_are_active_in_the_logs(runs):
    for method, (_, run_dir, _) in runs.items():
        records = log_records(run_dir)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        for r in records:
            assert r["generator/kl"] > 0 and torch.isfinite(torch.tensor(r["generator/kl"]))
            assert 0 < r["generator/kl_total"] < r["generator/loss"]
            vf_keys = [k for k in r if k.startswith("generator/vf_")]
            if method == "vae":
                assert vf_keys == []  # the plain VAE has no VF loss at all
            else:
                assert r["generator/vf_loss"] > 0 and r["generator/vf_w"] > 0 and r["generator/vf_total"] > 0
                assert r["generator/vf_mcos"] > 0  # a random projection is far from the features
        assert records[-1]["generator/gan_g"] != 0  # the GAN turned on at step 2 (loss.gan_start=2)


def test_vf_projection_is_checkpointed_and_the_foundation_encoder_is_not(runs):
    cfg, run_dir, _ = runs["vavae"]
    checkpoint = run_dir / "train" / "stage1" / "checkpoints" / "step_00000004"
    models = sorted(p.name for p in checkpoint.glob("model_*.safetensors"))
    assert models == [f"model_{name}.safetensors" for name in ("discriminator", "tokenizer", "vf_projection")]
    foundation = build_vf_loss(cfg, cfg.stages[1]).frozen_encoder
    foundation_shapes = {tuple(v.shape) for k, v in foundation.state_dict().items() if v.ndim > 1}
    projection = load_file(checkpoint / "model_vf_projection.safetensors")
    assert list(projection) == ["weight"] and projection["weight"].shape == (96, 4, 1, 1)
    for path in [*checkpoint.glob("*.safetensors"), run_dir / "stage1" / "model.safetensors"]:
        tensors = load_file(path)
        assert not any("embeddings" in k or ".layer." in k for k in tensors), path
        assert not foundation_shapes & {tuple(v.shape) for v in tensors.values() if v.ndim > 1}, path
    saved = load_file(run_dir / "stage1" / "model.safetensors")
    assert set(saved) == set(VAETokenizer(VAEConfig.like(cfg.model, "vavae")).state_dict())


def test_foundation_encoder_is_frozen_and_identical_to_aligntoks_start():
    cfg = fast_config("vavae")
    vf = build_vf_loss(cfg, cfg.stages[1])
    assert all(not p.requires_grad for p in vf.frozen_encoder.parameters()) and not vf.frozen_encoder.training
    aligntok_cfg = load_config(TokenizerTrainConfig, TINY["aligntok"], FAST)
    aligntok_start = build_stage_tokenizer(aligntok_cfg, Path("unused"), STAGES[1])
    ours, theirs = vf.frozen_encoder.state_dict(), aligntok_start.encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # A training step moves the projection and the VAE, never the foundation encoder.
    torch.manual_seed(0)
    tok = build_tokenizer(cfg)
    task = TokenizerStageTask(tok, cfg.stages[1], ReconstructionLoss(cfg.loss), None, kl=cfg.kl, vf=vf)
    assert "vf_projection" in task.modules() and all(m is not vf.frozen_encoder for m in task.modules().values())
    trained = {id(p) for p in task.optimizers()["generator"]}
    assert {id(p) for p in vf.projection.parameters()} <= trained
    assert not trained & {id(p) for p in vf.frozen_encoder.parameters()}
    before = state(vf.frozen_encoder)
    task.train_mode()
    task.losses({"image": images()}, step=5)["generator"][0].backward()
    assert vf.projection.weight.grad is not None and vf.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vf.frozen_encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in vf.frozen_encoder.state_dict().items())


class _RecordingVF:
    """Wraps a VFLoss and records the loss its adaptive weight balances against."""

    def __init__(self, vf: VFLoss) -> None:
        self.vf, self.balanced_against = vf, []
        self.projection = vf.projection

    def __call__(self, x, z, nll, last_layer):
        self.balanced_against.append(nll.detach())
        return self.vf(x, z, nll, last_layer)


def test_vf_weight_balances_against_l1_plus_lpips_alone_as_vavae():
    """VA-VAE's calculate_adaptive_weight_vf takes nll_loss (L1 + LPIPS), not the GAN-weighted total."""
    cfg = fast_config("vavae")
    torch.manual_seed(0)
    recording = _RecordingVF(build_vf_loss(cfg, cfg.stages[1]))
    task = TokenizerStageTask(build_tokenizer(cfg), cfg.stages[1], ReconstructionLoss(cfg.loss), None, kl=cfg.kl,
                              vf=recording)
    task.train_mode()
    logs = task.losses({"image": images()}, step=5)["generator"][1]  # after gan_start=2: a GAN term is on
    assert logs["gan_w"] > 0 and logs["rec_total"] != logs["nll"]
    assert len(recording.balanced_against) == 1
    torch.testing.assert_close(recording.balanced_against[0], logs["nll"])


def test_vavae_resume_matches_an_uninterrupted_run(tmp_path):
    # The VAE draws posterior noise from torch's global RNG, so this also checks that the RNG state
    # comes back exactly (and that building the data loader draws nothing from it).
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_tokenizer(fast_config("vavae"), straight)
    train_tokenizer(fast_config("vavae", "stage1.train.steps=2"), interrupted)
    (interrupted / "stage1").rename(tmp_path / "stage1_at_step2")  # keep the checkpoint, drop the output
    train_tokenizer(fast_config("vavae"), interrupted)
    a = load_file(straight / "stage1" / "model.safetensors")
    b = load_file(interrupted / "stage1" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    checkpoints = [run / "train" / "stage1" / "checkpoints" / "step_00000004" for run in (straight, interrupted)]
    a, b = (load_file(c / "model_vf_projection.safetensors")["weight"] for c in checkpoints)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ model and posterior


@pytest.fixture
def vae() -> VAETokenizer:
    torch.manual_seed(0)
    return build_tokenizer(fast_config("vae")).eval()


def test_encode_is_the_posterior_mean_and_training_decodes_samples(vae):
    x = images()
    with torch.no_grad():
        mean, logvar = vae.posterior(x)
        assert torch.equal(vae.encode(x), mean) and torch.equal(vae.encode(x), vae.encode(x))
        recon, z = vae(x)
        assert torch.equal(z, mean) and recon.shape == x.shape
    assert mean.shape == logvar.shape == (2, 4, 4, 4)

    torch.manual_seed(1)
    sample = sample_posterior(mean, logvar)
    torch.manual_seed(1)
    torch.testing.assert_close(sample, mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))  # the formula
    assert not torch.equal(sample, mean)
    with pytest.raises(ValueError, match="scale images to \\[-1, 1\\]"):
        vae.encode(x * 255)


def test_kl_of_a_diagonal_gaussian_by_hand():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(diagonal_gaussian_kl(zeros, zeros), torch.zeros(2))
    # mean 1, variance 1: 0.5 * mean^2 per element; variance 2, mean 0: 0.5 * (2 - 1 - ln 2) per element.
    torch.testing.assert_close(diagonal_gaussian_kl(zeros + 1, zeros), torch.full((2,), 0.5 * 36))
    log2 = torch.log(torch.tensor(2.0))
    expected = 0.5 * (2 - 1 - log2) * 36
    torch.testing.assert_close(diagonal_gaussian_kl(zeros, zeros + log2), torch.full((2,), float(expected)))


def test_save_load_round_trip_is_bitwise_and_any_tokenizer_class_loads_it(vae, tmp_path):
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    vae.set_latent_stats(torch.linspace(-1, 1, 4), torch.linspace(0.5, 2, 4))
    x = images()
    with torch.no_grad():
        z = vae.encode(x)
        recon = vae.decode(z)
    vae.save_pretrained(tmp_path / "tok", card_extra={"method": "vae"})
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    document = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert document["method"] == "vae" and "encoder" not in document  # no foundation encoder behind a VAE
    for cls in (AlignTokTokenizer, VAETokenizer, LatentTokenizer):
        loaded = cls.from_pretrained(tmp_path / "tok")
        assert isinstance(loaded, VAETokenizer) and not loaded.training and loaded.config == vae.config
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z), recon)
        assert torch.equal(loaded.normalize_latents(z), vae.normalize_latents(z))

    (tmp_path / "tok" / "config.json").write_text(json.dumps({**document, "method": "vqgan"}))
    with pytest.raises(TokenizerNotFoundError, match="unknown tokenizer method 'vqgan'"):
        AlignTokTokenizer.from_pretrained(tmp_path / "tok")


# ----------------------------------------------------------------------------------------------- VF loss


def test_vf_terms_on_a_hand_checkable_case():
    # Two tokens. Features: orthogonal unit vectors. Projected latent: both tokens equal to the first.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # (B, C, h, w), tokens e1, e2
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)  # tokens e1, e1
    # Per-token cosines 1 and 0: relu(1 - m1 - 1) = 0 and relu(1 - m1 - 0) = 1 - m1, averaged.
    assert marginal_cosine_loss(z, features, 0.0).item() == pytest.approx(0.5)
    assert marginal_cosine_loss(z, features, 0.5).item() == pytest.approx(0.25)
    assert marginal_cosine_loss(z, features, 1.0).item() == 0.0
    # Similarity matrices: identity vs all ones; |difference| is 1 off the diagonal (2 of 4 entries).
    assert marginal_distance_matrix_loss(z, features, 0.0).item() == pytest.approx(0.5)
    assert marginal_distance_matrix_loss(z, features, 0.25).item() == pytest.approx(2 * 0.75 / 4)
    assert marginal_distance_matrix_loss(z, features, 1.0).item() == 0.0
    # Scale does not matter: both terms compare directions.
    assert marginal_distance_matrix_loss(3 * z, 0.5 * features, 0.25).item() == pytest.approx(0.375)
    with pytest.raises(ValueError, match="same shape"):
        marginal_cosine_loss(z, features[:, :, :, :1], 0.5)


def test_vf_gradient_is_zero_inside_the_margins_and_not_outside():
    features = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    close = (features + 0.05 * torch.randn(features.shape, generator=torch.Generator().manual_seed(1)))
    close.requires_grad_(True)
    loss = marginal_cosine_loss(close, features, 0.5) + marginal_distance_matrix_loss(close, features, 0.25)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(close.grad) == 0

    far = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss = marginal_cosine_loss(far, features, 0.5) + marginal_distance_matrix_loss(far, features, 0.25)
    loss.backward()
    assert loss.item() > 0 and far.grad.abs().sum() > 0


class _FixedFeatures(nn.Module):
    """A stand-in foundation encoder: fixed features on any grid, whichever preprocessing feeds it."""

    hidden_size = 5
    patch_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.features = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(3))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        assert grid == (3, 3)
        return self.features * self.scale

    def encode_pixels(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        assert pixels.shape[-2:] == (12, 12)
        return self(pixels, grid)


def test_vf_targets_are_fed_as_vavae_feeds_its_dinov2():
    """VA-VAE's code: the [-1, 1] image, bilinear resize without antialiasing, no ImageNet normalisation."""
    torch.manual_seed(0)
    encoder = build_random_encoder(RandomEncoderConfig(hidden_size=16, num_heads=2, patch_size=14, image_size=56), stride=16)
    x = torch.rand(2, 3, 64, 64) * 2 - 1  # a 4x4 latent grid: 56 px for patch 14, as 256 px -> 224 px
    vf = VFLoss(VFLossConfig(), foundation_encoder=encoder, latent_channels=4)
    with torch.no_grad():
        pixels = F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False)
        tokens = encoder.model(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS
        expected = tokens.reshape(2, 4, 4, 16).permute(0, 3, 1, 2)
        torch.testing.assert_close(vf.reference(x, (4, 4)), expected)
        own = VFLoss(VFLossConfig(preprocess="encoder"), foundation_encoder=encoder, latent_channels=4)
        torch.testing.assert_close(own.reference(x, (4, 4)), encoder(x, (4, 4)))
        assert (own.reference(x, (4, 4)) - expected).abs().max() > 1e-2  # the two really differ
    with pytest.raises(ConfigError, match="preprocess='imagenet'"):
        VFLossConfig(preprocess="imagenet").validate()


def test_vf_adaptive_weight_is_the_gradient_norm_ratio_at_the_encoder_last_layer():
    torch.manual_seed(0)
    last_layer = nn.Parameter(torch.randn(4, 4))  # stands in for the encoder's output convolution
    latent_in = torch.randn(2, 4, 3, 3)
    z = torch.einsum("oc,bchw->bohw", last_layer, latent_in)
    rec = (z - 1).square().mean()
    cfg = VFLossConfig(weight=0.1, cos_margin=0.0, distmat_margin=0.0)
    vf = VFLoss(cfg, foundation_encoder=_FixedFeatures(), latent_channels=4)
    assert not vf.frozen_encoder.scale.requires_grad
    total, logs = vf(torch.zeros(2, 3, 12, 12), z, rec, last_layer)

    projected = vf.projection(z)
    features = vf.frozen_encoder.features
    expected_vf = marginal_cosine_loss(projected, features, 0) + marginal_distance_matrix_loss(projected, features, 0)
    rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    vf_grad = torch.autograd.grad(expected_vf, last_layer, retain_graph=True)[0]
    expected_w = 0.1 * rec_grad.norm() / (vf_grad.norm() + 1e-4)
    torch.testing.assert_close(logs["vf_loss"], expected_vf.detach())
    torch.testing.assert_close(logs["vf_w"], expected_w)
    torch.testing.assert_close(total, expected_w * expected_vf)
    assert total.requires_grad and not logs["vf_w"].requires_grad

    # VA-VAE's units: its nll is summed over the 3*12*12 values per image; its clamp (here 1.0) binds there.
    per_image = 3 * 12 * 12
    clamped = VFLoss(
        VFLossConfig(weight=0.1, cos_margin=0.0, distmat_margin=0.0, adaptive_max=1.0),
        foundation_encoder=_FixedFeatures(), latent_channels=4,
    )
    clamped.projection.load_state_dict(vf.projection.state_dict())
    total, logs = clamped(torch.zeros(2, 3, 12, 12), z, rec, last_layer)
    reference_w = 0.1 * torch.clamp(per_image * rec_grad.norm() / (vf_grad.norm() + 1e-4), 0.0, 1.0)
    assert per_image * rec_grad.norm() / (vf_grad.norm() + 1e-4) > 1.0  # the clamp binds
    torch.testing.assert_close(per_image * (rec + total), per_image * rec + reference_w * expected_vf)
    torch.testing.assert_close(logs["vf_w"], reference_w / per_image)

    fixed = VFLoss(VFLossConfig(weight=0.3, adaptive=False), foundation_encoder=_FixedFeatures(), latent_channels=4)
    total, logs = fixed(torch.zeros(2, 3, 12, 12), z, rec, last_layer)
    assert logs["vf_w"].item() == pytest.approx(0.3)
    torch.testing.assert_close(total, 0.3 * logs["vf_loss"])


@pytest.mark.parametrize("name", ["vae_f16d32", "vavae_f16d32", "aligntok_dinov2_f16d32"])
def test_imagenet_configs_start_the_gan_after_vavaes_2500_batches(name):
    """VA-VAE's disc_start 5001 counts Lightning's global_step, which its two optimizers (autoencoder and
    discriminator, both stepped per batch) advance twice per batch: at batch b the discriminator step sees
    2b + 1, so its GAN starts at batch 2500. Our steps count batches."""
    vavae_disc_start, steps_per_batch = 5001, 2
    first_batch = next(b for b in range(10_000) if steps_per_batch * b + 1 >= vavae_disc_start)
    cfg = load_config(TokenizerTrainConfig, CONFIGS / f"{name}.yaml")
    assert cfg.loss.gan_start == first_batch == 2500


def test_rerunning_a_finished_run_with_other_settings_is_refused_and_keeps_its_recorded_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-tokenizer", str(TINY["vae"]), "--out", str(run), *FAST]) == 0
    recorded = (run / "config.yaml").read_text()
    for change, named in (("model.latent_channels=8", "model.latent_channels: 4 -> 8"),
                          ("stage1.train.steps=9", "stage1.train.steps")):
        capsys.readouterr()
        assert main(["train-tokenizer", str(TINY["vae"]), "--out", str(run), *FAST, change]) == 2
        err = capsys.readouterr().err.strip()
        assert "stage 1 is finished" in err and named in err and "\n" not in err
        assert f"delete {run / 'stage1'}, {run / 'train' / 'stage1'} to train from stage 1 again" in err
        assert (run / "config.yaml").read_text() == recorded
    # settings that change how a stage runs, not what it computes, keep the finished stage
    assert main(["train-tokenizer", str(TINY["vae"]), "--out", str(run), *FAST, "stage1.train.log_every=3"]) == 0
    # the output alone deleted: its last checkpoint is not exported as another config's weights
    shutil.rmtree(run / "stage1")
    capsys.readouterr()
    assert main(["train-tokenizer", str(TINY["vae"]), "--out", str(run), *FAST, "loss.l1_weight=2.0"]) == 2
    assert "finished at step 4 with other settings (loss.l1_weight: 1.0 -> 2.0)" in capsys.readouterr().err
    # more steps, nothing else: the run extends from that checkpoint
    assert main(["train-tokenizer", str(TINY["vae"]), "--out", str(run), *FAST, "stage1.train.steps=9"]) == 0
    assert log_records(run)[-1]["step"] == 9
