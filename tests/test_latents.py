"""The latent cache: shards equal the tokenizer's encodings, statistics are exact, re-runs resume."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aligntok.cli import main
from aligntok.data import build_dataset, write_shards
from aligntok.data import latents as latents_module
from aligntok.data.latent_dataset import (
    ChannelMoments,
    LatentDataset,
    read_cache_metadata,
)
from aligntok.data.latents import cache_latents
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

RESOLUTION = 16
SETTINGS = {"resolution": RESOLUTION, "batch_size": 3, "shard_size": 4, "num_workers": 0, "builtin_size": 10}


def make_tokenizer(directory: Path) -> Path:
    """A tiny random tokenizer (stride 4, 4 latent channels) saved like a trained one."""
    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 8, [1, 2, 2], 4
    torch.manual_seed(0)
    AlignTokTokenizer.from_config(cfg).save_pretrained(directory)
    return directory


def shard_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("shard-*.safetensors"))


def all_latents(cache: Path) -> dict[str, torch.Tensor]:
    shards = [load_file(str(path)) for path in shard_files(cache)]
    return {key: torch.cat([s[key] for s in shards]) for key in ("latents", "latents_flip", "labels", "indices")}


@pytest.fixture
def cached(tmp_path):
    """A fresh cache per test (seconds): some tests delete shards or rewrite the statistics."""
    root = tmp_path
    tokenizer = make_tokenizer(root / "tok")
    before = AlignTokTokenizer.from_pretrained(tokenizer)
    result = cache_latents(tokenizer, "builtin:shapes", root / "cache", progress=False, **SETTINGS)
    return root, before, result


def test_shards_hold_the_tokenizers_latents_of_the_images_and_their_mirror_images(cached):
    root, tok, result = cached
    dataset = build_dataset("builtin:shapes", RESOLUTION, builtin_size=10)
    stored = all_latents(root / "cache")
    assert [p.name for p in shard_files(root / "cache")] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert stored["indices"].tolist() == list(range(10))  # every image once, in order
    images = torch.stack([dataset[i]["image"] for i in range(10)])
    with torch.no_grad():
        torch.testing.assert_close(stored["latents"], tok.encode(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stored["latents_flip"], tok.encode(images.flip(-1)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stored["latents"], stored["latents_flip"])
    assert stored["labels"].tolist() == [dataset[i]["label"] for i in range(10)]
    assert result.written_shards == [0, 1, 2]


def test_statistics_equal_a_direct_computation_and_land_in_the_tokenizer_config(cached):
    root, _, _ = cached
    stored = all_latents(root / "cache")
    both = torch.cat([stored["latents"], stored["latents_flip"]]).double()
    mean, std = both.mean(dim=(0, 2, 3)), both.std(dim=(0, 2, 3))
    meta = read_cache_metadata(root / "cache")
    np.testing.assert_allclose(meta["latent_mean"], mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(meta["latent_std"], std.numpy(), rtol=1e-12)
    assert meta["num_images"] == 10 and meta["num_classes"] == 10 and meta["skipped_images"] == 0
    saved = json.loads((root / "tok" / "config.json").read_text())["tokenizer"]
    np.testing.assert_allclose(saved["latent_mean"], mean.numpy(), rtol=1e-6, atol=1e-7)  # stored as float32
    np.testing.assert_allclose(saved["latent_std"], std.numpy(), rtol=1e-6)
    # The tokenizer directory is still a complete tokenizer with unchanged weights.
    reloaded = AlignTokTokenizer.from_pretrained(root / "tok")
    x = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode(x), cached[1].encode(x), rtol=0, atol=0)
        z = reloaded.encode(x)
        torch.testing.assert_close(reloaded.denormalize_latents(reloaded.normalize_latents(z)), z)


def test_moments_merge_exactly():
    parts = [torch.randn(n, 3, 2, 2, dtype=torch.float64) * 5 + 7 for n in (1, 4, 9)]
    merged = ChannelMoments.empty(3)
    for part in parts:
        merged = merged.merge(ChannelMoments.of(part))
    whole = torch.cat(parts)
    torch.testing.assert_close(merged.mean, whole.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(merged.std, whole.std(dim=(0, 2, 3)))


def test_a_rerun_after_deleting_a_shard_recomputes_only_that_shard(cached, caplog):
    root, _, _ = cached
    cache = root / "cache"
    files = shard_files(cache)
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files if p.name != "shard-00001.safetensors"}
    before = load_file(str(cache / "shard-00001.safetensors"))
    (cache / "shard-00001.safetensors").unlink()
    (cache / ".shard-00002.safetensors.tmp-0").write_bytes(b"half a shard")  # an interrupted write
    result = cache_latents(root / "tok", "builtin:shapes", cache, progress=False, **SETTINGS)
    assert result.written_shards == [1]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files(cache) if p.name in kept} == kept
    after = load_file(str(cache / "shard-00001.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(cache.glob(".shard-*"))
    # the same statistics again: nothing to warn about; other data's do replace them, with a warning
    assert "replacing the latent statistics" not in caplog.text
    cache_latents(root / "tok", "builtin:shapes-centered", root / "other", progress=False, **SETTINGS)
    assert "replacing the latent statistics" in caplog.text


def test_a_rerun_with_other_settings_is_refused(cached):
    root, _, _ = cached
    with pytest.raises(ValueError, match="other settings.*shard_size"):
        cache_latents(root / "tok", "builtin:shapes", root / "cache", progress=False, **{**SETTINGS, "shard_size": 5})


def test_latent_dataset_reads_the_cache(cached):
    root, _, _ = cached
    dataset = LatentDataset(root / "cache")
    stored = all_latents(root / "cache")
    assert len(dataset) == 10 and dataset.latent_shape == (4, 4, 4) and dataset.num_classes == 10
    for index in (0, 3, 4, 9, -1):
        item = dataset[index]
        assert torch.equal(item["latent"], stored["latents"][index])
        assert torch.equal(item["latent_flip"], stored["latents_flip"][index])
        assert item["label"] == int(stored["labels"][index]) and item["index"] == int(stored["indices"][index])
    with pytest.raises(IndexError):
        dataset[10]
    with pytest.raises(FileNotFoundError, match="not a finished latent cache"):
        LatentDataset(root)


def test_unreadable_images_are_skipped_counted_and_not_duplicated(tmp_path):
    for name, colour in (("a/0.png", 10), ("a/1.png", 90), ("b/0.png", 160), ("b/1.png", 240)):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (colour, 0, 0)).save(tmp_path / "images" / name)
    (tmp_path / "images" / "a" / "1.png").write_bytes(b"not a png")
    (tmp_path / "images" / "b" / "0.png").write_bytes(b"")  # two bad files in a row, across two shards
    tok = make_tokenizer(tmp_path / "tok")
    settings = {**SETTINGS, "shard_size": 2}
    result = cache_latents(tok, str(tmp_path / "images"), tmp_path / "cache", progress=False, **settings)
    stored = all_latents(tmp_path / "cache")
    assert result.metadata["skipped_images"] == 2, result.metadata["skipped_files"]
    assert [Path(f.split(":")[0]).name for f in result.metadata["skipped_files"]] == ["1.png", "0.png"]
    assert stored["indices"].tolist() == [0, 3] and stored["labels"].tolist() == [0, 1]
    assert result.metadata["num_images"] == 2


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="multiple of the tokenizer's stride 4"):
        cache_latents(tok, "builtin:shapes", tmp_path / "c", resolution=18, builtin_size=4, progress=False)
    args = ["cache-latents", "--tokenizer", str(tmp_path / "missing"), "--data", "builtin:shapes", "--out", str(tmp_path / "c")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and "\n" not in err


def test_cli_caches_under_torchrun_with_two_ranks_like_one_process(tmp_path):
    """Ranks encode disjoint shards; the cache equals a single process's, shard for shard."""
    tok = make_tokenizer(tmp_path / "tok")
    common = ["--data", "builtin:shapes", "--resolution", "16", "--batch-size", "3", "--shard-size", "4",
              "--num-workers", "0", "--builtin-size", "10"]
    assert main(["cache-latents", "--tokenizer", str(tok), "--out", str(tmp_path / "one"), *common]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "aligntok.cli", "cache-latents", "--tokenizer", str(tok), "--out", str(tmp_path / "two"), *common]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = all_latents(tmp_path / "one"), all_latents(tmp_path / "two")
    assert two["indices"].tolist() == list(range(10))
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-6, atol=1e-6)
    meta_one, meta_two = read_cache_metadata(tmp_path / "one"), read_cache_metadata(tmp_path / "two")
    np.testing.assert_allclose(meta_one["latent_std"], meta_two["latent_std"], rtol=1e-6)


def test_webdataset_shards_cache_one_shard_per_tar(tmp_path):
    dataset = build_dataset("builtin:shapes", RESOLUTION, builtin_size=5)
    samples = [dataset[i] for i in range(5)]
    write_shards(({"image": s["image"], "label": s["label"]} for s in samples), str(tmp_path / "tars" / "%06d.tar"), 3)
    tok = make_tokenizer(tmp_path / "tok")
    spec = str(tmp_path / "tars" / "{000000..000001}.tar")
    result = cache_latents(tok, spec, tmp_path / "cache", progress=False, **SETTINGS)
    assert [s["images"] for s in result.metadata["shards"]] == [3, 2]
    stored = all_latents(tmp_path / "cache")
    images = torch.stack([s["image"] for s in samples])
    with torch.no_grad():  # PNG round trip of [-1, 1] floats loses nothing beyond uint8 rounding
        expected = AlignTokTokenizer.from_pretrained(tok).encode(images)
    torch.testing.assert_close(stored["latents"], expected, rtol=1e-4, atol=1e-4)
    assert stored["labels"].tolist() == [s["label"] for s in samples]
    assert stored["indices"].tolist() == [0, 1, 2, 0, 1]  # position in its tar


CLI_SETTINGS = ["--data", "builtin:shapes", "--resolution", "16", "--batch-size", "3", "--shard-size", "4",
                "--num-workers", "0", "--builtin-size", "10"]


def test_a_full_disk_while_caching_is_one_line_and_a_rerun_completes_the_same_cache(cached, tmp_path, monkeypatch, capsys):
    root, _, _ = cached  # root / "cache": made by one uninterrupted run
    work = tmp_path / "interrupted"
    tok = make_tokenizer(work / "tok")  # the same weights as the fixture's cache was made with
    real_save, calls = latents_module.save_safetensors, []

    def full_after_one_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(latents_module, "save_safetensors", full_after_one_shard)
    assert main(["cache-latents", "--tokenizer", str(tok), "--out", str(work / "cache"), *CLI_SETTINGS]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and "re-run the same command" in err
    assert [p.name for p in shard_files(work / "cache")] == ["shard-00000.safetensors"]
    assert not (work / "cache" / "cache.json").exists()
    monkeypatch.undo()
    result = cache_latents(tok, "builtin:shapes", work / "cache", progress=False, **SETTINGS)
    assert result.written_shards == [1, 2]  # the complete shard is kept, the rest made
    expected, actual = all_latents(root / "cache"), all_latents(work / "cache")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: a write past `limit` bytes fails with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_real_storage_failure_under_safetensors_is_one_line_and_keeps_the_tokenizer(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    config_before = (tok / "config.json").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "aligntok.cli", "cache-latents", "--tokenizer", str(tok),
               "--out", str(tmp_path / "cache"), *CLI_SETTINGS]
    # Shards (~3 kB) fit; rewriting the tokenizer (~700 kB of weights) with its statistics does not.
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120,
                          preexec_fn=_file_size_limit(64_000))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "File too large" in done.stderr.strip().splitlines()[-1]
    assert (tok / "config.json").read_text() == config_before  # intact, not half rewritten
    assert main(["cache-latents", "--tokenizer", str(tok), "--out", str(tmp_path / "cache"), *CLI_SETTINGS]) == 0
    assert AlignTokTokenizer.from_pretrained(tok).config.latent_mean is not None


def _bad_image_folder(root: Path) -> Path:
    """Six 20 px PNGs in two classes, two of them unreadable (one empty, one not a PNG)."""
    for index in range(6):
        path = root / ("a" if index < 3 else "b") / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (40 * index, 0, 0)).save(path)
    (root / "a" / "1.png").write_bytes(b"not a png")
    (root / "b" / "3.png").write_bytes(b"")
    return root


@pytest.mark.parametrize("kind", ["folder", "tars"])
def test_workers_load_every_shard_through_one_loader_and_change_nothing(tmp_path, monkeypatch, kind):
    if kind == "folder":
        data = str(_bad_image_folder(tmp_path / "images"))
    else:  # three tars for two workers: their batches interleave
        dataset = build_dataset("builtin:shapes", RESOLUTION, builtin_size=7)
        write_shards(({"image": dataset[i]["image"], "label": dataset[i]["label"]} for i in range(7)),
                     str(tmp_path / "tars" / "%06d.tar"), 3)
        data = str(tmp_path / "tars" / "{000000..000002}.tar")
    tok = make_tokenizer(tmp_path / "tok")
    settings = {**SETTINGS, "shard_size": 2, "batch_size": 2}
    serial = cache_latents(tok, data, tmp_path / "serial", progress=False, **settings)
    loaders = []
    real_loader = latents_module.DataLoader

    def counting_loader(*args, **kwargs):
        loaders.append(kwargs.get("num_workers"))
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(latents_module, "DataLoader", counting_loader)
    parallel = cache_latents(tok, data, tmp_path / "parallel", progress=False, **{**settings, "num_workers": 2})
    assert loaders == [2]  # one loader for all shards: workers start once and load across shard boundaries
    assert len(shard_files(tmp_path / "serial")) == 3 and parallel.written_shards == [0, 1, 2]
    for a, b in zip(shard_files(tmp_path / "serial"), shard_files(tmp_path / "parallel"), strict=True):
        # The same batches through the same encoder, whichever process decoded them.
        x, y = load_file(str(a)), load_file(str(b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), a.name
    for key in ("skipped_files", "latent_mean", "latent_std", "num_images"):
        assert serial.metadata[key] == parallel.metadata[key], key
