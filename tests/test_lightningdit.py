"""LightningDiT: presets, compatibility with the reference implementation, persistence, the importer."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil

import pytest
import torch

from aligntok.config import ConfigError
from aligntok.models.lightningdit import (
    LIGHTNINGDIT_PRESETS,
    LightningDiT,
    LightningDiTConfig,
)
from aligntok.models.lightningdit_import import import_lightningdit_checkpoint

# Two tiny configs that together exercise every option of the reference.
MODERN = {
    "input_size": 12, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2, "num_heads": 4, "num_classes": 10,
    "class_dropout_prob": 0.1, "use_qknorm": True, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
}  # fmt: skip
CLASSIC = {
    "input_size": 8, "patch_size": 1, "in_channels": 4, "hidden_size": 64, "depth": 2, "num_heads": 4, "num_classes": 10,
    "class_dropout_prob": 0.1, "use_qknorm": True, "use_swiglu": False, "use_rope": False, "use_rmsnorm": False,
    "wo_shift": True, "learn_sigma": True,
}  # fmt: skip

# State-dict keys and shapes of the reference (hustvl/LightningDiT models/lightningdit.py) for those
# configs, listed by hand from its code: timm PatchEmbed/Mlp names, adaLN_modulation as Sequential(SiLU,
# Linear), a frozen pos_embed parameter and EVA rotary tables as saved buffers.
REFERENCE_KEYS_MODERN = {
    "pos_embed": (1, 36, 64),
    "x_embedder.proj.weight": (64, 4, 2, 2),
    "x_embedder.proj.bias": (64,),
    "t_embedder.mlp.0.weight": (64, 256),
    "t_embedder.mlp.0.bias": (64,),
    "t_embedder.mlp.2.weight": (64, 64),
    "t_embedder.mlp.2.bias": (64,),
    "y_embedder.embedding_table.weight": (11, 64),
    "feat_rope.freqs_cos": (36, 16),
    "feat_rope.freqs_sin": (36, 16),
    "final_layer.norm_final.weight": (64,),
    "final_layer.linear.weight": (16, 64),
    "final_layer.linear.bias": (16,),
    "final_layer.adaLN_modulation.1.weight": (128, 64),
    "final_layer.adaLN_modulation.1.bias": (128,),
} | {
    f"blocks.{i}.{name}": shape
    for i in range(2)
    for name, shape in {
        "norm1.weight": (64,),
        "norm2.weight": (64,),
        "attn.qkv.weight": (192, 64),
        "attn.qkv.bias": (192,),
        "attn.q_norm.weight": (16,),
        "attn.k_norm.weight": (16,),
        "attn.proj.weight": (64, 64),
        "attn.proj.bias": (64,),
        "mlp.w12.weight": (340, 64),  # 2 * int(2/3 * 256)
        "mlp.w12.bias": (340,),
        "mlp.w3.weight": (64, 170),
        "mlp.w3.bias": (64,),
        "adaLN_modulation.1.weight": (384, 64),
        "adaLN_modulation.1.bias": (384,),
    }.items()
}
REFERENCE_KEYS_CLASSIC = {
    "pos_embed": (1, 64, 64),
    "x_embedder.proj.weight": (64, 4, 1, 1),
    "x_embedder.proj.bias": (64,),
    "t_embedder.mlp.0.weight": (64, 256),
    "t_embedder.mlp.0.bias": (64,),
    "t_embedder.mlp.2.weight": (64, 64),
    "t_embedder.mlp.2.bias": (64,),
    "y_embedder.embedding_table.weight": (11, 64),
    "final_layer.linear.weight": (8, 64),  # learned sigma doubles the output
    "final_layer.linear.bias": (8,),
    "final_layer.adaLN_modulation.1.weight": (128, 64),
    "final_layer.adaLN_modulation.1.bias": (128,),
} | {
    f"blocks.{i}.{name}": shape
    for i in range(2)
    for name, shape in {
        "attn.qkv.weight": (192, 64),
        "attn.qkv.bias": (192,),
        "attn.q_norm.weight": (16,),
        "attn.q_norm.bias": (16,),
        "attn.k_norm.weight": (16,),
        "attn.k_norm.bias": (16,),
        "attn.proj.weight": (64, 64),
        "attn.proj.bias": (64,),
        "mlp.fc1.weight": (256, 64),
        "mlp.fc1.bias": (256,),
        "mlp.fc2.weight": (64, 256),
        "mlp.fc2.bias": (64,),
        "adaLN_modulation.1.weight": (256, 64),  # no shift: 4 chunks
        "adaLN_modulation.1.bias": (256,),
    }.items()
}

# Outputs of the reference model for the weights of `_deterministic_weights` and the inputs of
# `_reference_inputs`: out.flatten()[::41] and out.sum(). Recorded once by importing the reference's
# models/lightningdit.py (commit 2725fed, timm 1.0.31, TORCHDYNAMO_DISABLE=1) on CPU in fp32.
REFERENCE_OUTPUTS = {
    "MODERN": (
        [1.803838849067688, -1.3563308715820312, 1.8073294162750244, -1.6875114440917969, 0.8532288074493408,
         -0.5650610327720642, 1.3305938243865967, -0.5674554109573364, -0.3367224931716919, 0.13573172688484192,
         0.05286526679992676, 1.3066271543502808, -1.2626014947891235, 1.2457634210586548, -1.2655717134475708,
         -1.6349895000457764, 1.7527354955673218, -1.7361304759979248, 1.6068413257598877, -1.7993069887161255,
         1.9437599182128906, -1.3764135837554932, 0.5240072011947632, -0.7595620155334473, 0.9561318159103394,
         0.9734779596328735, -0.590535044670105, 0.7166861295700073, -0.8445171117782593],
        88.80072645843029,
    ),
    "CLASSIC": (
        [-7.770386695861816, -7.804698944091797, 0.7832022905349731, 0.7704669237136841, 8.796428680419922,
         11.338168144226074, 11.397686004638672, -7.070380210876465, -0.11816254258155823, -0.12071934342384338,
         6.782350540161133, 9.438953399658203, 9.54511833190918],
        1417.677297592163,
    ),
}  # fmt: skip


def _deterministic_weights(model: LightningDiT) -> dict[str, torch.Tensor]:
    """Every parameter set to sin-valued numbers (independent of RNG and init); the fixed position and
    rotary tables are left to the model, so the outputs also check those tables."""
    weights = {}
    for index, name in enumerate(sorted(model.state_dict())):
        if name.startswith(("pos_embed", "feat_rope.")):
            continue
        shape = model.state_dict()[name].shape
        values = torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 0.7 + index) * 0.3
        weights[name] = values.float().reshape(shape)
    return weights


def _reference_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = (torch.sin(torch.arange(2 * 4 * size * size, dtype=torch.float64) * 1.3) * 1.5).float().reshape(2, 4, size, size)
    return x, torch.tensor([0.25, 0.8]), torch.tensor([3, 10])  # label 10 is the null label


def _tiny(**overrides) -> LightningDiT:
    torch.manual_seed(0)
    return LightningDiT(LightningDiTConfig(**{**MODERN, **overrides})).eval()


def _randomise(model: LightningDiT, seed: int = 0) -> LightningDiT:
    """Give the zero-initialised adaLN/output layers random values so outputs depend on every weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("preset", sorted(LIGHTNINGDIT_PRESETS))
def test_every_preset_builds_and_keeps_the_latent_shape(preset):
    depth, hidden, heads, patch = LIGHTNINGDIT_PRESETS[preset]
    with torch.device("meta"):
        model = LightningDiT(LightningDiTConfig.from_preset(preset))
        out = model(torch.empty(2, 32, 16, 16), torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == (2, 32, 16, 16)
    assert len(model.blocks) == depth and model.config.hidden_size == hidden
    assert model.config.num_heads == heads and model.x_embedder.proj.kernel_size == (patch, patch)
    assert model.pos_embed.shape == (1, (16 // patch) ** 2, hidden)


def test_presets_cover_every_size_at_patch_1_and_2():
    sizes = {"S", "B", "L", "XL", "1p0B", "1p6B"}
    assert set(LIGHTNINGDIT_PRESETS) == {f"LightningDiT-{s}/{p}" for s in sizes for p in (1, 2)}


def test_xl1_parameter_count_matches_the_reference():
    with torch.device("meta"):
        model = LightningDiT(LightningDiTConfig.from_preset("LightningDiT-XL/1"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = sum(t.numel() for t in model.state_dict().values())
    # The reference's numbers for LightningDiT-XL/1 (SwiGLU, RoPE, RMSNorm, 32 channels, 16x16, 1000 classes).
    assert trainable == 674_961_824
    assert stored == 675_293_600  # + frozen pos_embed and rotary tables
    assert 670e6 < trainable < 680e6


@pytest.mark.parametrize("options, expected", [(MODERN, REFERENCE_KEYS_MODERN), (CLASSIC, REFERENCE_KEYS_CLASSIC)])
def test_state_dict_names_and_shapes_match_the_reference(options, expected):
    model = LightningDiT(LightningDiTConfig(**options))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("name, options", [("MODERN", MODERN), ("CLASSIC", CLASSIC)])
def test_outputs_match_the_reference_for_the_same_weights(name, options):
    model = LightningDiT(LightningDiTConfig(**options)).eval()
    model.load_state_dict(_deterministic_weights(model), strict=False)
    x, t, y = _reference_inputs(options["input_size"])
    with torch.no_grad():
        out = model(x, t, y)
    expected_slice, expected_sum = REFERENCE_OUTPUTS[name]
    assert out.shape == x.shape
    torch.testing.assert_close(out.flatten()[::41], torch.tensor(expected_slice), atol=2e-5, rtol=1e-5)
    assert out.double().sum().item() == pytest.approx(expected_sum, rel=1e-5)


def test_reference_initialisation_zeroes_the_output():
    model = _tiny()
    out = model(torch.randn(3, 4, 12, 12), torch.rand(3), torch.tensor([0, 5, 10]))
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: final layer starts at zero
    assert not any(name == "pos_embed" for name, _ in model.named_parameters())


def test_scalar_time_broadcasts_and_label_dropout_uses_the_null_label():
    model = _randomise(_tiny(class_dropout_prob=1.0))
    x, y = torch.randn(2, 4, 12, 12), torch.tensor([1, 2])
    with torch.no_grad():
        eval_scalar_t = model(x, 0.3, y)
        eval_vector_t = model(x, torch.full((2,), 0.3), y)
        null_out = model(x, 0.3, torch.full((2,), 10))
        model.train()  # dropout probability 1: every label becomes the null label
        dropped = model(x, 0.3, y)
    torch.testing.assert_close(eval_scalar_t, eval_vector_t)
    torch.testing.assert_close(dropped, null_out)
    assert not torch.allclose(eval_scalar_t, null_out)
    assert model.null_label == 10 and _tiny(class_dropout_prob=0.0).null_label is None


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain = _randomise(_tiny()).train()
    checkpointed = _randomise(_tiny(gradient_checkpointing=True)).train()
    x, t, y = torch.randn(2, 4, 12, 12), torch.rand(2), torch.tensor([1, 2])
    losses = []
    for model in (plain, checkpointed):
        model.y_embedder.dropout_prob = 0.0  # no random label dropout in this comparison
        loss = model(x, t, y).square().mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bad_inputs_and_configs_fail_with_one_line_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 4, 12, 12\)"):
        model(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 4, 12, 12), torch.rand(3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer labels"):
        model(torch.randn(2, 4, 12, 12), torch.rand(2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="unknown LightningDiT preset 'LightningDiT-XXL/1'"):
        LightningDiTConfig.from_preset("LightningDiT-XXL/1")
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        LightningDiT(LightningDiTConfig(**{**MODERN, "num_heads": 5}))
    with pytest.raises(ConfigError, match="unknown LightningDiT config field"):
        LightningDiTConfig.from_preset("LightningDiT-B/1", use_flash=True)


def test_save_pretrained_round_trip(tmp_path):
    model = _randomise(_tiny())
    out_dir = tmp_path / "dit"
    model.save_pretrained(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    document = json.loads((out_dir / "config.json").read_text())
    assert document["format"] == "aligntok-lightningdit" and document["config"]["use_rope"] is True
    loaded = LightningDiT.from_pretrained(out_dir).eval()
    assert loaded.config == model.config
    x, t, y = torch.randn(2, 4, 12, 12), torch.rand(2), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert all(p.requires_grad for p in loaded.parameters())
    # Saving again over an existing directory replaces it and leaves no temporary directories behind.
    _randomise(model, seed=1).save_pretrained(out_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["dit"]
    reloaded = LightningDiT.from_pretrained(out_dir)
    assert torch.equal(reloaded.final_layer.linear.weight, model.final_layer.linear.weight)


def test_from_pretrained_rejects_incomplete_directories(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        LightningDiT.from_pretrained(tmp_path)
    _tiny().save_pretrained(tmp_path / "d")
    config_path = tmp_path / "d" / "config.json"
    document = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**document, "config": {**document["config"], "depth": 3}}))
    with pytest.raises(ValueError, match=r"missing keys: blocks\.2\."):
        LightningDiT.from_pretrained(tmp_path / "d")
    config_path.write_text(json.dumps({**document, "config": {**document["config"], "use_flash": True}}))
    with pytest.raises(ConfigError, match="unknown config key 'use_flash'"):
        LightningDiT.from_pretrained(tmp_path / "d")
    config_path.write_text(json.dumps({"format": "aligntok-tokenizer"}))
    with pytest.raises(ValueError, match="is not a LightningDiT config"):
        LightningDiT.from_pretrained(tmp_path / "d")


def _reference_style_checkpoint(model: LightningDiT, prefix: str) -> dict[str, torch.Tensor]:
    """A state dict as the reference's train.py saves it: pos_embed included, wrapper prefixes added."""
    return {prefix + name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_importer_prefers_ema_strips_prefixes_and_infers_options(tmp_path):
    options = {"input_size": 12, "in_channels": 4, "num_classes": 10, "depth": 2}  # depth cut to keep the test fast
    raw_model = _randomise(LightningDiT(LightningDiTConfig.from_preset("LightningDiT-S/2", **options, use_qknorm=True)), seed=1)
    ema_model = _randomise(LightningDiT(LightningDiTConfig.from_preset("LightningDiT-S/2", **options, use_qknorm=True)), seed=2)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": _reference_style_checkpoint(raw_model, "module."),
            "ema": _reference_style_checkpoint(ema_model, "_orig_mod.module."),
            "opt": {"state": {}, "param_groups": [{"lr": 2e-4}]},
            "config": {
                "model": {"model_type": "LightningDiT-S/2"},
                "sample": {"sampling_method": "euler", "num_sampling_steps": 250, "cfg_scale": 6.7, "cfg_interval_start": 0.125},
            },
        },
        path,
    )
    imported = import_lightningdit_checkpoint(path, tmp_path / "out", preset="LightningDiT-S/2", depth=2)
    # use_qknorm, in_channels, input_size and num_classes come from the checkpoint, not the preset.
    assert imported.config == ema_model.config
    loaded = LightningDiT.from_pretrained(tmp_path / "out")
    # Sampled as the reference samples it: 3 guided channels, its scale and interval, no shift (its default
    # when the key is absent), 250 grid points = 249 steps.
    assert loaded.sampler_settings == {"cfg_channels": 3, "cfg_scale": 6.7, "cfg_interval_start": 0.125,
                                       "timestep_shift": 0.0, "num_steps": 249, "method": "euler"}
    for name, tensor in ema_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_importer_takes_model_weights_without_ema(tmp_path):
    config = LightningDiTConfig.from_preset("LightningDiT-S/1", input_size=8, in_channels=4, depth=2)
    model = _randomise(LightningDiT(config))
    torch.save({"model": _reference_style_checkpoint(model, "_orig_mod.")}, tmp_path / "ckpt.pt")
    loaded = import_lightningdit_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out", preset="LightningDiT-S/1", depth=2)
    assert torch.equal(loaded.final_layer.linear.weight, model.final_layer.linear.weight)
    assert loaded.sampler_settings == {"cfg_channels": 3}  # no config saved: the reference's guidance alone


def test_importer_infers_the_preset_and_checks_a_given_one(tmp_path):
    # B/1 at its real width and patch, cut to 2 blocks: a preset is found from width and patch alone.
    config = LightningDiTConfig.from_preset("LightningDiT-B/1", input_size=2, in_channels=4, num_classes=3, depth=2)
    model = _randomise(LightningDiT(config))
    torch.save({"ema": _reference_style_checkpoint(model, "module.")}, tmp_path / "b1.pt")
    loaded = import_lightningdit_checkpoint(tmp_path / "b1.pt", tmp_path / "out", depth=2)
    assert loaded.config == config
    assert torch.equal(loaded.final_layer.linear.weight, model.final_layer.linear.weight)
    with pytest.raises(ValueError, match="holds hidden_size=768, patch_size=1 but preset LightningDiT-XL/1 has hidden_size=1152, patch_size=1"):
        import_lightningdit_checkpoint(tmp_path / "b1.pt", tmp_path / "out2", preset="LightningDiT-XL/1", depth=2)
    # A full-depth S/2 needs no preset and no overrides at all.
    small = LightningDiTConfig.from_preset("LightningDiT-S/2", input_size=4, in_channels=4, num_classes=3)
    torch.save({"model": LightningDiT(small).state_dict()}, tmp_path / "s2.pt")
    assert import_lightningdit_checkpoint(tmp_path / "s2.pt", tmp_path / "out3").config == small
    # Sizes that are no preset are named.
    odd = LightningDiT(LightningDiTConfig(input_size=4, in_channels=4, hidden_size=64, depth=1, num_heads=4, num_classes=3))
    torch.save({"model": odd.state_dict()}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="holds depth=1, hidden_size=64, patch_size=1, which is no LightningDiT preset"):
        import_lightningdit_checkpoint(tmp_path / "odd.pt", tmp_path / "out4")
    # A file torch will not load weights-only: the reason, not torch's advice to unpickle it anyway.
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="cannot be read as a weights-only torch checkpoint") as caught:
        import_lightningdit_checkpoint(tmp_path / "garbage.pt", tmp_path / "out5")
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)


def test_importer_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model = LightningDiT(LightningDiTConfig.from_preset("LightningDiT-S/2", input_size=8, in_channels=4))
    state = _reference_style_checkpoint(model, "")
    del state["blocks.3.attn.proj.bias"]
    state["blocks.0.attn.extra.weight"] = torch.zeros(1)
    state["blocks.1.attn.qkv.bias"] = torch.zeros(7)
    torch.save({"ema": state}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError) as info:
        import_lightningdit_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out", preset="LightningDiT-S/2")
    message = str(info.value)
    assert "\n" not in message
    assert "missing keys: blocks.3.attn.proj.bias" in message
    assert "unexpected keys: blocks.0.attn.extra.weight" in message
    assert "blocks.1.attn.qkv.bias (7,) != (1152,)" in message
    assert not (tmp_path / "out").exists()


def test_importer_rejects_wrong_preset_and_unsafe_or_empty_files(tmp_path):
    model = LightningDiT(LightningDiTConfig.from_preset("LightningDiT-S/2", input_size=8, in_channels=4, depth=2))
    torch.save({"ema": model.state_dict()}, tmp_path / "s2.pt")
    with pytest.raises(ValueError, match="holds depth=2, hidden_size=384, patch_size=2 but preset LightningDiT-B/2"):
        import_lightningdit_checkpoint(tmp_path / "s2.pt", tmp_path / "out", preset="LightningDiT-B/2")
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "nostate.pt")
    with pytest.raises(ValueError, match="no 'ema' or 'model' state dict"):
        import_lightningdit_checkpoint(tmp_path / "nostate.pt", tmp_path / "out")
    torch.save({"ema": model.state_dict(), "extra": LightningDiTConfig()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights-only"):
        import_lightningdit_checkpoint(tmp_path / "pickled.pt", tmp_path / "out")
    with pytest.raises(ValueError, match="checkpoint not found"):
        import_lightningdit_checkpoint(tmp_path / "absent.pt", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Guidance as the reference applies it
# ---------------------------------------------------------------------------------------------


def _reference_forward_with_cfg(model, x, t, y, cfg_scale, cfg_interval, cfg_interval_start):
    """A re-statement of the reference's ``LightningDiT.forward_with_cfg`` (hustvl/LightningDiT,
    models/lightningdit.py, commit 2725fed): the batch is a conditional half and an unconditional half; the
    model runs on the first half's latents twice; only output channels 0-2 are guided, identically in both
    halves; with ``cfg_interval`` true, a batch whose ``t[0]`` is below ``cfg_interval_start`` is not guided;
    the other channels stay as the model gave them (so the conditional half holds the conditional ones)."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    cond, uncond = out[: len(x) // 2, :3], out[len(x) // 2 :, :3]
    guided = uncond + cfg_scale * (cond - uncond)
    if cfg_interval and t[0] < cfg_interval_start:
        guided = cond
    return torch.cat([torch.cat([guided, guided]), out[:, 3:]], dim=1)


def _reference_euler_sample(model, z, y, null, num_points, shift, cfg_scale, cfg_interval_start):
    """The reference's guided ODE sampling (inference.py with sample_ode, Euler): ``z`` and the labels doubled
    with the null label, the grid ``linspace(0, 1, num_points)`` (float32) shifted as ``s t / (1 + (s - 1) t)``,
    one Euler step per grid interval, and the conditional half of the result."""
    grid = torch.linspace(0, 1, num_points)
    grid = shift * grid / (1 + (shift - 1) * grid)
    x, labels = torch.cat([z, z]), torch.cat([y, torch.full_like(y, null)])
    for t, t_next in itertools.pairwise(grid):
        v = _reference_forward_with_cfg(model, x, torch.full((len(x),), float(t)), labels, cfg_scale, True, cfg_interval_start)
        x = x + (t_next - t) * v
    return x.chunk(2)[0]


def _guidance_model() -> LightningDiT:
    options = {**MODERN, "in_channels": 8, "input_size": 4, "num_classes": 5}
    model = LightningDiT(LightningDiTConfig(**options)).eval()
    model.load_state_dict(_deterministic_weights(model), strict=False)
    return model


@pytest.mark.parametrize("t", [0.05, 0.0999, 0.1, 0.3, 0.95])
def test_cfg_channels_3_gives_the_reference_forward_with_cfg(t):
    from aligntok.diffusion.samplers import guided_velocity

    model = _guidance_model()
    x = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 4, 2])
    t_ref = torch.full((6,), t)  # the reference gets float32 times, as the sampler calls the model with
    with torch.no_grad():
        expected = _reference_forward_with_cfg(
            model, torch.cat([x, x]), t_ref, torch.cat([y, torch.full_like(y, 5)]), 6.7, True, 0.1
        )[:3]
        ours = guided_velocity(model, x, float(t_ref[0]), y, cfg_scale=6.7, null_label=5, interval=(0.1, 1.0), channels=3)
        every_channel = guided_velocity(model, x, float(t_ref[0]), y, cfg_scale=6.7, null_label=5, interval=(0.1, 1.0))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    guided = t >= 0.1
    assert torch.allclose(every_channel[:, :3], ours[:, :3])  # the guided channels agree either way
    assert torch.allclose(every_channel[:, 3:], ours[:, 3:]) != guided  # the rest only without guidance


def test_guided_sampling_with_cfg_channels_3_follows_the_reference():
    from aligntok.diffusion.samplers import SamplerConfig, sample

    model = _guidance_model()
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 3])
    with torch.no_grad():
        # 9 grid points with shift 0.3: the first three (t = 0, 0.041, 0.091) fall before the interval's start.
        expected = _reference_euler_sample(model, z, y, 5, num_points=9, shift=0.3, cfg_scale=10.0, cfg_interval_start=0.1)
    config = SamplerConfig(method="euler", num_steps=8, cfg_scale=10.0, cfg_channels=3, cfg_interval_start=0.1, timestep_shift=0.3)
    ours = sample(model, y, config, noise=z)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    every_channel = sample(model, y, dataclasses.replace(config, cfg_channels=None), noise=z)
    assert (every_channel - expected).abs().max() > 1e-2  # guiding every channel is another sampler


def test_rotary_embedding_matches_the_reference_rotation_bitwise_and_broadcasts_over_stacked_q_k():
    from aligntok.models.lightningdit import RotaryEmbedding2D

    rope = RotaryEmbedding2D(head_dim=16, grid_size=6)
    q, k = torch.randn(2, 2, 4, 36, 16).unbind(0)
    # The reference's rotate_half: pairs (a, b) -> (-b, a), then x * cos + rotated * sin, in fp32.
    even, odd = q.unflatten(-1, (-1, 2)).unbind(-1)
    expected = q * rope.freqs_cos + torch.stack((-odd, even), dim=-1).flatten(-2) * rope.freqs_sin
    assert torch.equal(rope(q), expected)
    both = rope(torch.stack([q, k]))  # the attention rotates q and k in one pass when there is no QK-norm
    assert torch.equal(both[0], rope(q)) and torch.equal(both[1], rope(k))
    assert rope(q.bfloat16()).dtype == torch.bfloat16  # stays in the autocast dtype


@pytest.mark.slow  # inductor code generation: ~20 s of CPU
@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in (os.environ.get("CXX", "c++"), "g++", "clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler",
)
def test_torch_compile_gives_the_eager_outputs():
    # The speed option of benchmarks/bench_dit.py --compile: Module.compile in place keeps the state-dict
    # names. Inductor fuses elementwise ops (changing rounding order), hence a tolerance, not equality.
    torch._dynamo.reset()
    model = _randomise(_tiny(use_qknorm=False, depth=1))
    x, t, y = torch.randn(2, 4, 12, 12), torch.tensor([0.3, 0.9]), torch.tensor([1, 10])
    with torch.no_grad():
        eager = model(x, t, y)
        model.compile()
        compiled = model(x, t, y)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert set(model.state_dict()) == set(LightningDiT(model.config).state_dict())
