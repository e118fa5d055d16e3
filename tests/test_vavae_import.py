"""`aligntok import-vavae`: a latent-diffusion VA-VAE checkpoint becomes a tokenizer equal to the original."""

from __future__ import annotations

import hashlib
import json
import math
import zlib

import pytest
import torch
from diffusers import AutoencoderKL

from aligntok.cli import main
from aligntok.models.diffusers_vae import DiffusersVAETokenizer
from aligntok.models.tokenizer import LatentTokenizer
from aligntok.models.vavae_import import import_vavae_checkpoint

# A tiny VA-VAE in the reference's layout (hustvl/LightningDiT tokenizer/autoencoder.py, whose Encoder and
# Decoder take these arguments): ch=32, ch_mult=(1, 2), num_res_blocks=2, attention at the lowest
# resolution (attn_resolutions=(4,) at resolution=8, as [16] at 256 for the released f16d32), z=embed_dim=4.
CH, CH_MULT, BLOCKS, Z = 32, (1, 2), 2, 4
# sha256 of the sorted "name:shape" lines of that reference model's state dict (206 tensors).
REFERENCE_LAYOUT_SHA256 = "1ea0561d153069f971c237f17810895e8d701a9582e61102e980b85ab29240f9"

# Outputs of the reference model with the weights of `deterministic` and the inputs below, recorded once by
# running the reference's modules (quant_conv(encoder(x)) chunked into mean / logvar; decoder(post_quant_conv(z))).
REFERENCE_MEAN = [  # mean.flatten()[::5]
    -1.417093, -1.643748, 0.621147, 0.774988, 0.216463, -0.394262, -1.825111, 1.031429, -0.853083, -2.87743,
    3.592449, -0.531917, -2.160128, -2.348958, -0.892542, 0.628347, 0.149956, -0.495506, 0.65626, -1.053322,
    0.758357, -1.473048, -3.135713, 2.270801, -0.424884, -2.451665,
]  # fmt: skip
REFERENCE_MEAN_SUM, REFERENCE_MEAN_ABS_SUM = -43.12855, 162.03607
REFERENCE_LOGVAR = [  # logvar.flatten()[::9]
    2.258624, -1.32152, 1.712927, -0.494675, -0.466054, 2.294246, 0.350225, 2.175124, 0.206755, 1.466005,
    -0.848633, 0.147345, 1.947924, -0.924924, 3.25661,
]  # fmt: skip
REFERENCE_DECODED = [  # decoded.flatten()[::23]
    -0.484333, 0.016959, -0.009429, 0.439425, 0.874612, 0.553895, 2.930207, 0.255064, 0.274916, 0.058463,
    0.400454, 0.107544, -0.022331, 1.220894, -3.269005, 0.765044, -0.056712,
]  # fmt: skip
REFERENCE_DECODED_SUM, REFERENCE_DECODED_ABS_SUM = 144.38107, 283.39603


def ldm_vae_layout(ch: int, ch_mult: tuple[int, ...], blocks: int, z: int, attn_levels: set[int]) -> dict[str, tuple]:
    """Tensor names and shapes of a latent-diffusion KL-VAE (its naming scheme, spelled out for the test)."""
    shapes: dict[str, tuple] = {}

    def conv(name, out, inp, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, k, k), (out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, inp, out):
        norm(f"{name}.norm1", inp), conv(f"{name}.conv1", out, inp, 3), norm(f"{name}.norm2", out), conv(f"{name}.conv2", out, out, 3)
        if inp != out:
            conv(f"{name}.nin_shortcut", out, inp, 1)

    def attention(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def middle(side, c):
        resnet(f"{side}.mid.block_1", c, c), attention(f"{side}.mid.attn_1", c), resnet(f"{side}.mid.block_2", c, c)

    widths = [ch * m for m in ch_mult]
    conv("encoder.conv_in", ch, 3, 3)
    inp = ch
    for i, width in enumerate(widths):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", inp, width)
            inp = width
            if i in attn_levels:
                attention(f"encoder.down.{i}.attn.{j}", width)
        if i < len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv", width, width, 3)
    middle("encoder", inp)
    norm("encoder.norm_out", inp), conv("encoder.conv_out", 2 * z, inp, 3)
    conv("decoder.conv_in", inp, z, 3)
    middle("decoder", inp)
    for i in reversed(range(len(widths))):
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", inp, widths[i])
            inp = widths[i]
            if i in attn_levels:
                attention(f"decoder.up.{i}.attn.{j}", inp)
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", inp, inp, 3)
    norm("decoder.norm_out", inp), conv("decoder.conv_out", 3, inp, 3)
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    return shapes


def deterministic(name: str, shape: tuple) -> torch.Tensor:
    """A weight that is a pure function of its name and shape (sines; fan-in scaled; norms near 1)."""
    phase = zlib.crc32(name.encode()) % 1000 / 100.0
    base = torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 0.7 + phase).reshape(shape)
    if len(shape) > 1:
        return (base * (1.5 / math.sqrt(math.prod(shape[1:])))).float()
    return (1.0 + 0.1 * base).float() if name.endswith(".weight") else (0.05 * base).float()


def reference_checkpoint() -> dict[str, torch.Tensor]:
    layout = ldm_vae_layout(CH, CH_MULT, BLOCKS, Z, attn_levels={len(CH_MULT) - 1})
    lines = "\n".join(sorted(f"{name}:{shape}" for name, shape in layout.items()))
    assert hashlib.sha256(lines.encode()).hexdigest() == REFERENCE_LAYOUT_SHA256, "not the reference's layout"
    return {name: deterministic(name, shape) for name, shape in layout.items()}


def reference_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.sin(torch.arange(2 * 3 * 8 * 8, dtype=torch.float64) * 0.31).reshape(2, 3, 8, 8).float() * 0.9
    z = torch.cos(torch.arange(2 * Z * 4 * 4, dtype=torch.float64) * 0.23).reshape(2, Z, 4, 4).float()
    return x, z


def test_an_imported_checkpoint_encodes_and_decodes_as_the_original(tmp_path):
    # As released: wrapped in state_dict, with the training-only loss and foundation-model weights beside the VAE.
    extra = {"loss.logvar": torch.zeros(()), "foundation_model.model.cls_token": torch.zeros(1, 1, 8)}
    torch.save({"state_dict": {**reference_checkpoint(), **extra}}, tmp_path / "vavae.pt")
    stats = {"mean": torch.arange(Z, dtype=torch.float32).view(1, Z, 1, 1), "std": torch.full((1, Z, 1, 1), 2.0)}
    torch.save(stats, tmp_path / "latents_stats.pt")
    assert main(["import-vavae", str(tmp_path / "vavae.pt"), "--out", str(tmp_path / "vavae"),
                 "--latent-stats", str(tmp_path / "latents_stats.pt")]) == 0

    tok = LatentTokenizer.from_pretrained(tmp_path / "vavae")
    assert isinstance(tok, DiffusersVAETokenizer) and (tok.stride, tok.latent_channels) == (2, Z)
    x, z = reference_inputs()
    with torch.no_grad():
        mean = tok.encode(x)
        logvar = tok.vae.encode(x).latent_dist.logvar
        decoded = tok.decode(z)
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(mean.flatten()[::5], torch.tensor(REFERENCE_MEAN), **close)
    torch.testing.assert_close(logvar.flatten()[::9], torch.tensor(REFERENCE_LOGVAR), **close)
    torch.testing.assert_close(decoded.flatten()[::23], torch.tensor(REFERENCE_DECODED), **close)
    assert mean.sum().item() == pytest.approx(REFERENCE_MEAN_SUM, abs=1e-3)
    assert mean.abs().sum().item() == pytest.approx(REFERENCE_MEAN_ABS_SUM, abs=1e-3)
    assert decoded.sum().item() == pytest.approx(REFERENCE_DECODED_SUM, abs=1e-3)
    assert decoded.abs().sum().item() == pytest.approx(REFERENCE_DECODED_ABS_SUM, abs=1e-3)
    # LightningDiT's normalisation (multiplier 1): (z - mean) / std, per channel.
    assert tok.config.latent_mean == [0.0, 1.0, 2.0, 3.0] and tok.config.latent_std == [2.0] * Z
    # The directory is diffusers' own format too.
    vae = AutoencoderKL.from_pretrained(tmp_path / "vavae")
    assert vae.config.down_block_types[-1] == "AttnDownEncoderBlock2D" and vae.config.scaling_factor == 1.0


def test_a_safetensors_checkpoint_imports_the_same(tmp_path):
    from safetensors.torch import save_file

    state = reference_checkpoint()
    torch.save({"state_dict": state}, tmp_path / "vavae.pt")
    save_file({f"first_stage_model.{k}": v for k, v in state.items()}, str(tmp_path / "vavae.safetensors"))
    a = import_vavae_checkpoint(tmp_path / "vavae.pt", tmp_path / "a")
    b = import_vavae_checkpoint(tmp_path / "vavae.safetensors", tmp_path / "b")
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key  # the same tensors, renamed the same way


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    state = reference_checkpoint()
    del state["decoder.up.1.attn.2.q.weight"]
    torch.save(state, tmp_path / "incomplete.pt")  # a bare state dict is read too
    cases = {
        "other.pt": "is not a latent-diffusion VAE checkpoint",
        "junk.pt": "is not a readable torch checkpoint",
        "missing.pt": "does not exist",
        "incomplete.pt": "1 missing and 0 unexpected tensors (first: decoder.up_blocks.0.attentions.2.to_q.weight)",
    }
    for name, message in cases.items():
        assert main(["import-vavae", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    torch.save({"state_dict": reference_checkpoint()}, tmp_path / "ok.pt")
    for factor in ("0", "-1", "nan"):  # diffusers would multiply the latents by it
        assert main(["import-vavae", str(tmp_path / "ok.pt"), "--out", str(tmp_path / "out"), "--scaling-factor", factor]) == 2
        assert "--scaling-factor must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_statistics_the_latents_are_only_scaled(tmp_path):
    torch.save({"state_dict": reference_checkpoint()}, tmp_path / "vavae.pt")
    import_vavae_checkpoint(tmp_path / "vavae.pt", tmp_path / "vavae", scaling_factor=0.5)
    tok = LatentTokenizer.from_pretrained(tmp_path / "vavae")
    assert tok.config.latent_mean == [0.0] * Z and tok.config.latent_std == [2.0] * Z
    assert json.loads((tmp_path / "vavae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
