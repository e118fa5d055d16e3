"""The three tokenizer stages: what trains, what stays bitwise frozen, where each stage starts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligntok.config import ConfigError, load_config
from aligntok.losses.reconstruction import ReconstructionLoss
from aligntok.models.tokenizer import AlignTokTokenizer
from aligntok.training.checkpoint import latest_checkpoint, load_state
from aligntok.training.stages import (
    PARTS,
    STAGES,
    TokenizerStageTask,
    TokenizerTrainConfig,
    add_decoder_noise,
    build_recon_loss,
    build_semantic_loss,
    build_stage_tokenizer,
    stage_train_dir,
    train_tokenizer,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tokenizer" / "tiny.yaml"

# Smaller than the shipped tiny config so that the whole three-stage run takes seconds.
FAST = [
    "data.resolution=32",
    "data.num_workers=0",
    "model.decoder.base_channels=8",
    "model.decoder.channel_mult=[1,2,2,2]",
    "model.decoder.norm_groups=4",
    "model.adapter_hidden=16",
    "model.latent_channels=4",
    "loss.gan_start=2",
    *[f"stage{n}.train.{k}" for n in (1, 2, 3) for k in ("steps=3", "batch_size=4", "ckpt_every=10", "log_every=1")],
    "stage2.train.ema_decay=0.5",
]


def _parts(tok: AlignTokTokenizer) -> dict[str, dict[str, torch.Tensor]]:
    return {p: {k: v.detach().clone() for k, v in getattr(tok, p).state_dict().items()} for p in PARTS}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The three stages, trained once per module; tests get copies through :func:`run`."""
    cfg = load_config(TokenizerTrainConfig, TINY, FAST)
    run_dir = tmp_path_factory.mktemp("tok_run")
    initial = _parts(build_stage_tokenizer(cfg, run_dir, STAGES[1]))
    outputs = train_tokenizer(cfg, run_dir)
    weights = {n: _parts(AlignTokTokenizer.from_pretrained(outputs[n])) for n in (1, 2, 3)}
    return cfg, run_dir, initial, weights


@pytest.fixture
def run(trained_run):
    """(config, run directory, initial weights, weights per stage): a test may change its copies freely."""
    cfg, run_dir, initial, weights = trained_run
    return copy.deepcopy(cfg), run_dir, copy.deepcopy(initial), copy.deepcopy(weights)


def test_stage_table_matches_the_paper():
    assert STAGES[1].trains == {"adapter", "decoder"} and not STAGES[1].semantic_loss
    assert STAGES[2].trains == set(PARTS) and STAGES[2].semantic_loss and STAGES[2].keeps_ema
    assert STAGES[3].trains == {"decoder"} and not STAGES[3].semantic_loss
    assert [STAGES[n].starts_from for n in (1, 2, 3)] == [None, 1, 2]


def test_each_stage_changes_exactly_its_parts(run):
    _, _, initial, weights = run
    before = {1: initial, 2: weights[1], 3: weights[2]}
    for n in (1, 2, 3):
        for part in PARTS:
            changed = _changed(before[n][part], weights[n][part])
            assert changed == (part in STAGES[n].trains), f"stage {n}: {part} changed={changed}"


def test_every_stage_leaves_a_loadable_tokenizer(run):
    cfg, run_dir, _, _ = run
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for n in (1, 2, 3):
        tok = AlignTokTokenizer.from_pretrained(run_dir / f"stage{n}")
        z = tok.encode(x)
        assert z.shape == (2, cfg.model.latent_channels, 4, 4)
        assert tok.decode(z).shape == x.shape
        assert (run_dir / f"stage{n}" / "README.md").is_file()


def test_frozen_parts_are_in_eval_mode_and_get_no_optimizer_state(run):
    cfg, run_dir, _, _ = run
    for n in (1, 3):
        tok = build_stage_tokenizer(cfg, run_dir, STAGES[n])
        task = TokenizerStageTask(tok, STAGES[n], ReconstructionLoss(cfg.loss), None)
        task.train_mode()
        trained = {id(p) for p in task.optimizers()["generator"]}
        for part in PARTS:
            module = getattr(tok, part)
            expect = part in STAGES[n].trains
            assert module.training == expect, (n, part)
            assert all((id(p) in trained) == expect for p in module.parameters()), (n, part)


def test_semantic_loss_is_zero_at_stage2_start_and_grows_with_drift(run):
    cfg, run_dir, _, _ = run
    tok = build_stage_tokenizer(cfg, run_dir, STAGES[2])
    task = TokenizerStageTask(tok, STAGES[2], ReconstructionLoss(cfg.loss), build_semantic_loss(cfg, run_dir))
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1}
    logs = task.losses(batch, step=0)["generator"][1]
    # The live encoder (autograd on) and its frozen copy (no_grad) may round differently: ~1e-15, not 0.
    start = float(logs["sp_total"])
    assert start == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        for p in tok.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    drifted = float(task.losses(batch, step=0)["generator"][1]["sp_total"])
    assert drifted > 1e-6 and drifted > 1e3 * start


def test_rerun_skips_finished_stages(run):
    cfg, run_dir, _, weights = run
    train_tokenizer(cfg, run_dir)
    again = _parts(AlignTokTokenizer.from_pretrained(run_dir / "stage3"))
    assert not any(_changed(again[p], weights[3][p]) for p in PARTS)


def test_decoder_noise_follows_each_channels_spread_and_is_off_at_zero():
    latent = torch.randn(64, 2, 4, 4) * torch.tensor([100.0, 1.0]).view(1, 2, 1, 1)
    assert add_decoder_noise(latent, 0.0) is latent
    torch.manual_seed(0)
    noise = add_decoder_noise(latent, 0.5) - latent
    per_channel = noise.std(dim=(0, 2, 3))
    # sigma ~ U(0, 0.5): the noise's spread is about 0.5 / sqrt(3) = 0.29 of each channel's own.
    assert 0.2 < per_channel[1] < 0.4 and 20 < per_channel[0] < 40


def test_stage3_with_decoder_noise_decodes_noised_latents(run):
    cfg, run_dir, _, _ = run
    tok = build_stage_tokenizer(cfg, run_dir, STAGES[3])
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1}

    def loss(noise: float) -> float:
        torch.manual_seed(0)
        task = TokenizerStageTask(tok, STAGES[3], ReconstructionLoss(cfg.loss), None, decoder_noise=noise)
        return float(task.losses(batch, step=0)["generator"][0])

    assert loss(0.0) == loss(0.0) and loss(0.5) != loss(0.0)
    with pytest.raises(ConfigError, match="decoder_noise"):
        load_config(TokenizerTrainConfig, TINY, ["stage3.decoder_noise=-1"])


def test_stage3_can_start_from_stage2_raw_weights_instead_of_ema(run):
    cfg, run_dir, _, weights = run
    cfg.stage3.init_from_ema = False
    raw = _parts(build_stage_tokenizer(cfg, run_dir, STAGES[3]))
    assert _changed(raw["decoder"], weights[2]["decoder"])  # stage 2 exported its EMA, not these
    cfg.stage3.init_from_ema = True
    assert not _changed(_parts(build_stage_tokenizer(cfg, run_dir, STAGES[3]))["decoder"], weights[2]["decoder"])


def test_fsdp_is_refused_for_tokenizer_stages():
    with pytest.raises(ConfigError, match="fsdp is not supported"):
        load_config(TokenizerTrainConfig, TINY, ["stage2.train.fsdp=true"])


def test_stage2_alone_without_stage1_output_names_what_is_missing(tmp_path):
    cfg = load_config(TokenizerTrainConfig, TINY, FAST)
    with pytest.raises(FileNotFoundError, match="stage 2 starts from stage 1"):
        train_tokenizer(cfg, tmp_path, stages=(2,))


def test_training_log_records_each_stage(run):
    _, run_dir, _, _ = run
    for n in (1, 2, 3):
        lines = (run_dir / "train" / f"stage{n}" / "log.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert records and all(r["step"] <= 3 for r in records)


def test_stage2_ema_warms_up_by_default_even_where_a_config_sets_only_its_decay():
    cfg = load_config(TokenizerTrainConfig, TINY)  # tiny.yaml sets stage2's ema_decay, not ema_warmup
    assert cfg.stage2.train.ema_decay == 0.98 and cfg.stage2.train.ema_warmup
    assert TokenizerTrainConfig().stage2.train.ema_warmup


def _disc_adam_steps(run_dir: Path, number: int) -> set[int]:
    file = latest_checkpoint(stage_train_dir(run_dir, number)) / "optimizer_discriminator.pt"
    return {int(values["step"]) for values in load_state(file)["state"].values()}


def test_stage2_starts_with_stage1s_discriminator_and_its_adam_moments(run):
    cfg, run_dir, _, _ = run
    stage1 = latest_checkpoint(stage_train_dir(run_dir, 1))
    loss, carried = build_recon_loss(cfg, run_dir, STAGES[2])
    assert carried == stage1
    expected = load_file(stage1 / "model_discriminator.safetensors")
    assert all(torch.equal(loss.discriminator.state_dict()[k], v) for k, v in expected.items())  # loaded as saved
    # loss.gan_start=2 is counted over the discriminator's life: after stage 1's 3 steps it is on from step 0.
    assert loss.config.gan_start == 0 and build_recon_loss(cfg, run_dir, STAGES[3])[0].config.gan_start == 0
    # The trained run continued Adam's state: stage 2's 3 discriminator steps add to stage 1's count.
    assert _disc_adam_steps(run_dir, 2) == {s + 3 for s in _disc_adam_steps(run_dir, 1)}

    cfg.stage2.gan_start = 7  # a stage's own gan_start wins
    assert build_recon_loss(cfg, run_dir, STAGES[2])[0].config.gan_start == 7
    cfg.stage2.gan_start, cfg.stage2.carry_discriminator = None, False
    fresh, none = build_recon_loss(cfg, run_dir, STAGES[2])
    assert none is None and fresh.config.gan_start == 2
    assert any(not torch.equal(fresh.discriminator.state_dict()[k], v) for k, v in expected.items())


def test_stage3_can_start_from_a_saved_tokenizer_and_keeps_its_latents(run, tmp_path):
    cfg, run_dir, _, weights = run
    cfg.stage3.carry_discriminator = False
    out = train_tokenizer(cfg, tmp_path / "again", stages=(3,), start_from=run_dir / "stage3")
    again = _parts(AlignTokTokenizer.from_pretrained(out[3]))
    assert not _changed(again["encoder"], weights[3]["encoder"]) and not _changed(again["adapter"], weights[3]["adapter"])
    assert _changed(again["decoder"], weights[3]["decoder"])
    with pytest.raises(ConfigError, match="starts from scratch"):
        train_tokenizer(cfg, tmp_path / "first", stages=(1,), start_from=run_dir / "stage3")
