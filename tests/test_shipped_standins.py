"""The stand-ins shipped as package data: pinned bytes, found without training, loaded like real networks.

They are the offline analogue of downloading DINOv2 and Inception weights, built by
``python -m aligntok.standins.build`` from fixed seeds. Rebuilding them in full takes minutes (marked
slow); a tiny recipe checks in seconds that the builder is deterministic, which is what lets the pinned
hashes be reproduced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from aligntok import standins
from aligntok.standins import build as build_module
from aligntok.standins.cache import SHIPPED_DIR, read_standin_info, recipe_key

#: sha256 of every shipped file (path relative to aligntok/standins/shipped). Rebuild with
#: `python -m aligntok.standins.build` after a recipe change, and update these with the new files.
PINNED_SHA256: dict[str, str] = {
    "encoder-3fe4c0b0c87ab3df/README.md": "19f60dc93417c45562d4974ecb974d4e1eee85eb9eeee7b16d40b527f6dbd1e1",
    "encoder-3fe4c0b0c87ab3df/config.json": "a84d66cd952ad7d125c98d72ed0acc5e12c14c4084fc22f883a260aac0233b64",
    "encoder-3fe4c0b0c87ab3df/model.safetensors": "56b5a330b5576c331a1ddc0d6126b7baed601af72b6f6e6a7956eee16ca54942",
    "encoder-3fe4c0b0c87ab3df/preprocessor_config.json": "69c3dd105ee3b469b7f104bc4a34849e1dacc5633ff7cef628b7769d3d9e5693",
    "encoder-3fe4c0b0c87ab3df/standin.json": "7f90a676762fc84e2d1d3b59d26f88dc21e61544a312e818abb250f037285b7a",
    "encoder-9a06c8f86f0fda0f/README.md": "19f60dc93417c45562d4974ecb974d4e1eee85eb9eeee7b16d40b527f6dbd1e1",
    "encoder-9a06c8f86f0fda0f/config.json": "a84d66cd952ad7d125c98d72ed0acc5e12c14c4084fc22f883a260aac0233b64",
    "encoder-9a06c8f86f0fda0f/model.safetensors": "d3c99361e038a0cfdf87684f35c0c9cda4a2bef1e760260b5906d9cca88c7293",
    "encoder-9a06c8f86f0fda0f/preprocessor_config.json": "69c3dd105ee3b469b7f104bc4a34849e1dacc5633ff7cef628b7769d3d9e5693",
    "encoder-9a06c8f86f0fda0f/standin.json": "3747e50da19d71e99e15dd46cd42c0cfacdef8e48de88dbcc894f4ea34f09197",
    "eval-32951dcc04427738/config.json": "f77e7afde57b5a1a27a4baff98ac7cb70038cbe4d68129253af6d80253c35897",
    "eval-32951dcc04427738/model.safetensors": "0848d0073c1edaa3341b726a191a7fbd52f7a74a7482eb7e24049fd32ac7074f",
    "eval-32951dcc04427738/standin.json": "3c75dc6f30cb2b522437ae4f27dd7ac5c3b5047b08c550113708d9fbe08b4c5a",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shipped_directory(name: str) -> Path:
    kind, preset = build_module.SHIPPED[name]
    presets = standins.STANDIN_ENCODERS if kind == "encoder" else standins.EVAL_NETWORKS
    return SHIPPED_DIR / f"{kind}-{recipe_key(kind, presets[preset])}"


def test_shipped_files_match_their_pinned_hashes():
    files = {p.relative_to(SHIPPED_DIR).as_posix(): _sha256(p) for p in sorted(SHIPPED_DIR.rglob("*")) if p.is_file()}
    assert files == PINNED_SHA256


def test_every_shipped_recipe_is_shipped_under_its_current_key():
    # A recipe change (settings or RECIPE_VERSION) changes the key: the stale directory would be ignored.
    for name in build_module.SHIPPED:
        directory = _shipped_directory(name)
        assert (directory / "standin.json").is_file(), f"{name}: {directory.name} is not shipped; rebuild"
        assert read_standin_info(directory)["key"] == directory.name.split("-", 1)[1]


@pytest.mark.parametrize("name", ["dinov2-shapes-p8", "dinov2-centered-p8"])
def test_shipped_stand_ins_are_used_without_training_and_load_like_real_networks(name, tmp_path, monkeypatch):
    from transformers import Dinov2Model

    from aligntok.models.encoders import load_encoder
    from aligntok.models.tokenizer import TokenizerConfig, build_foundation_encoder

    monkeypatch.setenv(standins.CACHE_ENV, str(tmp_path / "cache"))
    runs = dict(standins.TRAINING_RUNS)
    encoder_dir = standins.ensure_standin_encoder(name, progress=False)
    eval_dir = standins.ensure_eval_network("shapes-easy", progress=False)
    assert standins.TRAINING_RUNS == runs and not (tmp_path / "cache").exists()
    assert encoder_dir.parent == SHIPPED_DIR and eval_dir.parent == SHIPPED_DIR

    # The stand-in is a transformers DINOv2 directory: the loader of any DINOv2 checkpoint reads it.
    assert isinstance(Dinov2Model.from_pretrained(encoder_dir), Dinov2Model)
    encoder = load_encoder(str(encoder_dir), stride=8).eval()
    spec = build_foundation_encoder(TokenizerConfig(encoder=f"standin:{name}", decoder=_stride8_decoder())).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        tokens = encoder(images)
        assert tokens.shape == (2, 96, 8, 8)  # 8 px patches: an 8x8 grid at 64 px, as the demo's latent
        torch.testing.assert_close(spec(images), tokens, rtol=0, atol=0)

    # The evaluation network judges the demo's data: held-out accuracy recorded at build time, and re-measured.
    from aligntok.data.builtin import render_shapes

    network = standins.load_eval_network(eval_dir)
    assert read_standin_info(eval_dir)["heldout_class_accuracy"] >= 0.95
    held_out, labels = render_shapes(200, 64, seed=4242, difficulty="easy")
    assert standins.builtin_class_accuracy(held_out, labels, network=network) >= 0.9


def test_the_reproductions_encoder_is_semantic_on_its_data():
    # What the method starts from: a linear probe on its pooled tokens reads the class, a random init's does not.
    directory = standins.ensure_standin_encoder("dinov2-centered-p8", progress=False)
    assert read_standin_info(directory)["heldout_class_accuracy"] >= 0.8
    probe = standins.probe_standin_encoder(directory, num_train=600, num_test=400, difficulty="centered")
    assert probe["standin"]["accuracy"] >= 0.5 and probe["random_init"]["accuracy"] <= 0.3


def _stride8_decoder():
    from aligntok.models.decoder import DecoderConfig

    return DecoderConfig(channel_mult=[1, 1, 1, 1])


def test_the_builder_is_deterministic(tmp_path, monkeypatch):
    tiny_encoder = standins.StandinEncoderSettings(hidden_size=32, num_layers=1, num_heads=2, patch_size=8,
                                                   resolution=32, steps=3, batch_size=4, data_size=16,
                                                   heldout_size=10, warmup_steps=1)
    tiny_eval = standins.EvalNetworkSettings(widths=(8, 16), resolution=32, steps=3, batch_size=4, data_size=16,
                                             heldout_size=10, warmup_steps=1, difficulty="easy")
    monkeypatch.setitem(standins.STANDIN_ENCODERS, "tiny-encoder", tiny_encoder)
    monkeypatch.setitem(standins.EVAL_NETWORKS, "tiny-eval", tiny_eval)
    monkeypatch.setattr(build_module, "SHIPPED", {"a": ("encoder", "tiny-encoder"), "b": ("eval", "tiny-eval")})
    first = build_module.build(tmp_path / "one", progress=False)
    second = build_module.build(tmp_path / "two", progress=False)
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second, strict=True):
        assert _sha256(a / "model.safetensors") == _sha256(b / "model.safetensors")
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    with pytest.raises(ValueError, match="unknown shipped stand-in 'nope'"):
        build_module.build(tmp_path / "three", ["nope"], progress=False)


@pytest.mark.slow
def test_rebuilding_reproduces_the_shipped_weights(tmp_path):
    recorded = {read_standin_info(_shipped_directory(name))["torch"] for name in build_module.SHIPPED}
    if recorded != {torch.__version__}:
        pytest.skip(f"shipped weights were built with torch {sorted(recorded)}; bitwise equality needs the same")
    for path in build_module.build(tmp_path, progress=False):
        assert _sha256(path / "model.safetensors") == _sha256(SHIPPED_DIR / path.name / "model.safetensors")
