"""Offline stand-ins: the DINOv2-format foundation encoder and the built-in evaluation network.

Tiny recipes (a few steps, 32 px) keep this file fast; the defaults' accuracy is measured outside the
test suite (see the standins module and the project's reports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aligntok import standins
from aligntok.config import ConfigError, config_to_dict
from aligntok.eval import evaluate_generation, extract_features, save_npz
from aligntok.models.decoder import DecoderConfig
from aligntok.models.encoders import FoundationEncoder, load_encoder
from aligntok.models.tokenizer import TokenizerConfig, build_foundation_encoder
from aligntok.standins import (
    EvalNetworkSettings,
    StandinEncoderSettings,
    builtin_class_accuracy,
    builtin_fd,
    ensure_eval_network,
    ensure_standin_encoder,
    evaluate_builtin,
    load_eval_network,
    read_standin_info,
    resolve_encoder_spec,
)
from aligntok.standins.cache import recipe_key
from aligntok.standins.encoder import _build_dinov2

TINY_ENCODER = StandinEncoderSettings(
    hidden_size=32, num_layers=2, num_heads=2, patch_size=8, resolution=32, steps=4, batch_size=8,
    data_size=32, heldout_size=20, warmup_steps=1,
)
TINY_EVAL = EvalNetworkSettings(
    widths=(8, 16, 16), resolution=32, steps=4, batch_size=8, data_size=32, heldout_size=20, warmup_steps=1,
)
DINOV2_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "standin.json", "README.md"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(standins.CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    """One tiny evaluation network for the whole module (built under a private cache)."""
    root = tmp_path_factory.mktemp("eval-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(standins.CACHE_ENV, str(root))
        return ensure_eval_network(TINY_EVAL, progress=False)


def _uint8_images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Cache location and keys
# ---------------------------------------------------------------------------------------------


def test_cache_root_prefers_aligntok_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(standins.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert standins.cache_root() == tmp_path / "home" / ".cache" / "aligntok"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert standins.cache_root() == tmp_path / "xdg" / "aligntok"
    monkeypatch.setenv(standins.CACHE_ENV, str(tmp_path / "mine"))
    assert standins.cache_root() == tmp_path / "mine"


def test_recipe_key_changes_with_every_setting_and_kind():
    key = recipe_key("encoder", TINY_ENCODER)
    assert key == recipe_key("encoder", StandinEncoderSettings(**vars(TINY_ENCODER)))
    assert key != recipe_key("eval", TINY_ENCODER)
    for change in ({"steps": 5}, {"init_seed": 3}, {"hidden_size": 64}, {"data_seed": 1}):
        assert recipe_key("encoder", StandinEncoderSettings(**{**vars(TINY_ENCODER), **change})) != key


def test_impossible_settings_are_one_line_config_errors(cache):
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        ensure_standin_encoder(StandinEncoderSettings(hidden_size=30, num_heads=4), progress=False)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        ensure_standin_encoder(StandinEncoderSettings(resolution=40, patch_size=16), progress=False)
    with pytest.raises(ConfigError, match="widths"):
        ensure_eval_network(EvalNetworkSettings(widths=(8,)), progress=False)
    assert not (cache / "standins").exists() or not any((cache / "standins").glob("*-*"))


# ---------------------------------------------------------------------------------------------
# Stand-in foundation encoder
# ---------------------------------------------------------------------------------------------


def test_standin_encoder_is_trained_once_and_loads_like_a_transformers_dinov2(cache):
    from transformers import Dinov2Model

    runs = standins.TRAINING_RUNS["encoder"]
    rng_before = torch.get_rng_state()
    path = ensure_standin_encoder(TINY_ENCODER, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    assert standins.TRAINING_RUNS["encoder"] == runs + 1
    assert path.parent == cache / "standins" and DINOV2_FILES <= {p.name for p in path.iterdir()}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".") and p.is_dir()]  # no staging left
    info = read_standin_info(path)
    assert info["settings"] == config_to_dict(TINY_ENCODER) and info["recipe_version"] == standins.RECIPE_VERSION
    assert 0.0 <= info["heldout_class_accuracy"] <= 1.0 and np.isfinite(info["final_train_logs_last10"]["loss"])
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "BitImageProcessor"

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_standin_encoder(TINY_ENCODER, progress=False) == path
    assert standins.TRAINING_RUNS["encoder"] == runs + 1 and (path / "model.safetensors").stat().st_mtime_ns == mtime

    # The same loader as any transformers DINOv2 directory, with the preprocessor's normalisation.
    encoder = load_encoder(str(path), stride=8)
    assert isinstance(encoder, FoundationEncoder) and encoder.kind == "dinov2"
    assert isinstance(encoder.model, Dinov2Model)
    mean = torch.tensor(preprocessor["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocessor["image_std"]).view(1, 3, 1, 1)
    assert torch.allclose(encoder.pixel_mean, mean) and torch.allclose(encoder.pixel_std, std)
    reference = Dinov2Model.from_pretrained(path).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        tokens = encoder.eval()(x)
        expected = reference(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state[:, 1:]
    assert tokens.shape == (2, 32, 4, 4)
    torch.testing.assert_close(tokens, expected.reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
    # Trained, not just saved: the weights differ from a fresh model of the same architecture and seed.
    torch.manual_seed(TINY_ENCODER.init_seed)
    fresh = _build_dinov2(TINY_ENCODER)
    assert not torch.equal(fresh.embeddings.patch_embeddings.projection.weight,
                           reference.embeddings.patch_embeddings.projection.weight)


def test_incomplete_cache_directory_is_rebuilt(cache):
    path = ensure_standin_encoder(TINY_ENCODER, progress=False)
    (path / standins.INFO_FILE).unlink()  # as if someone emptied it by hand
    runs = standins.TRAINING_RUNS["encoder"]
    assert ensure_standin_encoder(TINY_ENCODER, progress=False) == path
    assert standins.TRAINING_RUNS["encoder"] == runs + 1 and (path / standins.INFO_FILE).is_file()


_CHILD = """
import json, sys
from aligntok import standins
from aligntok.config import config_from_dict
settings = config_from_dict(standins.StandinEncoderSettings, json.loads(sys.argv[1]))
path = standins.ensure_standin_encoder(settings, progress=False)
print(json.dumps({"path": str(path), "trained": standins.TRAINING_RUNS["encoder"],
                  "files": sorted(p.name for p in path.iterdir())}))
"""


def test_concurrent_first_runs_train_once_and_both_see_a_complete_directory(cache):
    env = {**os.environ, standins.CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"}
    settings = json.dumps(config_to_dict(TINY_ENCODER))
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, settings], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["trained"] for r in results) == [0, 1]
    assert all(DINOV2_FILES <= set(r["files"]) for r in results)
    assert [p.name for p in (cache / "standins").iterdir() if p.is_dir()] == [Path(results[0]["path"]).name]


def test_resolve_encoder_spec(cache, monkeypatch):
    assert resolve_encoder_spec("facebook/dinov2-small") == "facebook/dinov2-small"
    with pytest.raises(ValueError, match="unknown stand-in encoder 'standin:nope'.*standin:dinov2-shapes"):
        resolve_encoder_spec("standin:nope")
    monkeypatch.setitem(standins.STANDIN_ENCODERS, "tiny", TINY_ENCODER)
    path = resolve_encoder_spec("standin:tiny", progress=False)
    assert path == str(ensure_standin_encoder(TINY_ENCODER, progress=False))

    # Every config takes the spec: the tokenizer's encoder resolves it to the cached directory (no second training).
    runs = standins.TRAINING_RUNS["encoder"]
    config = TokenizerConfig(encoder="standin:tiny", decoder=DecoderConfig(channel_mult=[1, 1, 1, 1]))
    by_spec, by_path = build_foundation_encoder(config), load_encoder(path, stride=8)
    assert by_spec.stride == 8
    assert standins.TRAINING_RUNS["encoder"] == runs
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(by_spec.eval()(x), by_path.eval()(x), rtol=0, atol=0)


def test_presets_by_name(cache, monkeypatch):
    with pytest.raises(ValueError, match="unknown stand-in encoder 'nope'; available: dinov2-shapes"):
        ensure_standin_encoder("nope", progress=False)
    with pytest.raises(ValueError, match="unknown evaluation network 'nope'; available: shapes"):
        ensure_eval_network("nope", progress=False)
    monkeypatch.setitem(standins.EVAL_NETWORKS, "tiny", TINY_EVAL)
    path = ensure_eval_network("tiny", progress=False)
    assert read_standin_info(path)["settings"] == config_to_dict(TINY_EVAL)


def test_probe_compares_the_standin_with_a_random_init(cache):
    result = standins.probe_standin_encoder(
        ensure_standin_encoder(TINY_ENCODER, progress=False), num_train=30, num_test=20, stride=8
    )
    for name in ("standin", "random_init"):
        assert 0.0 <= result[name]["accuracy"] <= 1.0
        assert result[name]["num_train"] == 30 and result[name]["num_test"] == 20


def test_scene_targets_mark_the_patches_of_each_object_and_flip_with_the_image():
    from aligntok.data.scenes import SCENE_KINDS, make_scene_graph
    from aligntok.eval.images import from_uint8
    from aligntok.standins.recipe import ScenesInMemory

    data = ScenesInMemory.render(seed=3, size=12, resolution=32, patch_size=8)
    assert data.images.shape == (12, 3, 32, 32) and data.targets["token_kind"].shape == (12, 4, 4)
    for n in range(12):
        graph = make_scene_graph(3, n)
        counts = [sum(o.kind == kind for o in graph.objects) for kind in SCENE_KINDS]
        assert data.targets["kind_counts"][n].tolist() == counts
        assert int(data.targets["colours"][n].sum()) == len({o.colour for o in graph.objects})
        marked = set(data.targets["token_kind"][n].flatten().tolist()) - {0}
        assert marked <= {SCENE_KINDS.index(o.kind) + 1 for o in graph.objects}
        for obj in graph.objects:  # the patch holding an object's centre carries its kind
            col, row = (min(int(c * 4), 3) for c in obj.center)
            assert data.targets["token_kind"][n, row, col] == SCENE_KINDS.index(obj.kind) + 1
    images, targets = data.batch(64, torch.Generator().manual_seed(0), hflip=True)
    index = torch.randint(len(data), (64,), generator=torch.Generator().manual_seed(0))  # the batch's draw
    plain = data.targets["token_kind"][index].flatten(1)
    mirrored = data.targets["token_kind"][index].flip(-1).flatten(1)
    flipped = ~torch.all((images == from_uint8(data.images[index])).flatten(1), dim=1)
    assert 0 < flipped.sum() < 64
    assert torch.equal(targets["token_kind"], torch.where(flipped[:, None], mirrored, plain))


def test_mixed_recipe_learns_shapes_and_scenes_and_saves_a_dinov2(cache):
    mixed = standins.MixedEncoderSettings(**vars(TINY_ENCODER), scenes_per_batch=4, scenes_size=16)
    path = ensure_standin_encoder(mixed, progress=False)
    info = read_standin_info(path)
    assert 0.0 <= info["heldout_scene_token_kind_accuracy"] <= 1.0 and 0.0 <= info["heldout_class_accuracy"] <= 1.0
    logs = info["final_train_logs_last10"]
    assert {"class_ce", "pixel_mse", "count_ce", "colour_bce", "token_kind_ce"} <= set(logs)
    assert load_encoder(str(path), stride=8)(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 4, 4)
    # Another recipe than the shapes-only one with the same shared settings, so cached apart.
    assert recipe_key("encoder", mixed) != recipe_key("encoder", TINY_ENCODER)
    with pytest.raises(ConfigError, match="scenes_per_batch < batch_size"):
        ensure_standin_encoder(standins.MixedEncoderSettings(**vars(TINY_ENCODER), scenes_per_batch=8), progress=False)


# ---------------------------------------------------------------------------------------------
# Evaluation network
# ---------------------------------------------------------------------------------------------


def test_eval_network_features_logits_and_loading(eval_dir):
    network = load_eval_network(eval_dir)
    assert network.outputs == ("pool", "logits")
    features = extract_features(network, _uint8_images(5, 32, 0))
    assert features["pool"].shape == (5, 16) and features["logits"].shape == (5, 10)
    # Any image size (resized to its 32 px), float [-1, 1] tensors and uint8 NHWC arrays give the same.
    big = extract_features(network, _uint8_images(3, 64, 1))
    assert big["pool"].shape == (3, 16) and torch.isfinite(big["pool"]).all()
    images = _uint8_images(4, 32, 2)
    as_float = extract_features(network, images.float() / 127.5 - 1)
    as_array = extract_features(network, images.permute(0, 2, 3, 1).numpy())
    plain = extract_features(network, images)
    torch.testing.assert_close(as_float["logits"], plain["logits"])
    torch.testing.assert_close(as_array["pool"], plain["pool"])
    assert network.describe()["weights_sha256"] and read_standin_info(eval_dir)["kind"] == "eval"


def test_eval_network_directory_errors(tmp_path, eval_dir):
    with pytest.raises(FileNotFoundError, match="not an evaluation-network directory"):
        load_eval_network(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((eval_dir / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "widths": [8, 16, 32]}))
    (broken / "model.safetensors").write_bytes((eval_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not fit"):
        load_eval_network(broken)


def test_builtin_fd_and_class_accuracy(eval_dir):
    network = load_eval_network(eval_dir)
    images = _uint8_images(40, 32, 3)
    assert builtin_fd(images, images, network=network) == pytest.approx(0.0, abs=1e-6)
    shifted = (images.float() * 0.5).to(torch.uint8)  # darker images: another distribution
    fd = builtin_fd(images, shifted, network=network)
    assert fd > 1e-3
    logits = extract_features(network, images)["logits"]
    predicted = logits.argmax(dim=1)
    assert builtin_class_accuracy(images, predicted, network=network) == 1.0
    assert builtin_class_accuracy(images, (predicted + 1) % 10, network=network) == 0.0
    result = evaluate_builtin(images, predicted.numpy(), shifted, network=network)
    assert result["fd"] == pytest.approx(fd) and result["class_accuracy"] == 1.0
    assert result["num_samples"] == 40 and result["num_references"] == 40
    assert result["network"]["name"] == network.name
    with pytest.raises(ValueError, match="39 labels for 40 images"):
        builtin_class_accuracy(images, predicted[:39], network=network)
    with pytest.raises(ValueError, match="class indices"):
        builtin_class_accuracy(images, torch.full((40,), 10), network=network)


def test_eval_network_plays_inception_in_evaluate_generation(tmp_path, eval_dir):
    network = load_eval_network(eval_dir)
    samples, refs = tmp_path / "samples.npz", tmp_path / "refs.npz"
    save_npz(_uint8_images(24, 32, 4).permute(0, 2, 3, 1).numpy(), samples)
    save_npz(_uint8_images(24, 32, 5).permute(0, 2, 3, 1).numpy(), refs)
    result = evaluate_generation(samples, refs, inception=network, dinov2=None, is_split_size=2, device="cpu")
    assert result["fid"] == pytest.approx(builtin_fd(
        _uint8_images(24, 32, 4), _uint8_images(24, 32, 5), network=network), rel=1e-6)
    assert np.isfinite(result["inception_score"])
    assert result["provenance"]["feature_networks"][0]["name"] == network.name
