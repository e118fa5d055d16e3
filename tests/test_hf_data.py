"""`--data hf:NAME[:SPLIT]`: Hugging Face parquet datasets as resumable, distributed shard streams."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from aligntok.data import ShardDataset, build_dataset, build_loader
from aligntok.data.builtin import ShapesDataset
from aligntok.data.latents import cache_latents
from aligntok.data.parquet import HubDataset, parse_hf_spec
from aligntok.eval.images import to_uint8_nhwc
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = [f"class{i}" for i in range(10)]


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8_nhwc(image[None])[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_dataset(root: Path, *, bad_row: int | None = None) -> dict[str, dict]:
    """A dataset as the Hub's parquet conversion lays it out: data/{split}-0000K-of-0000N.parquet, images as
    ``datasets`` Image structs, a ClassLabel in the files' ``huggingface`` metadata. Returns caption -> sample."""
    source = ShapesDataset(14, 16, seed=3)
    samples = {s["caption"]: s for s in (source[i] for i in range(14))}
    rows = list(samples.values())
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": CLASSES},
                "caption": {"_type": "Value", "dtype": "string"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    parts = {"train-00000-of-00002": rows[:5], "train-00001-of-00002": rows[5:10], "validation-00000-of-00001": rows[10:]}
    (root / "data").mkdir(parents=True)
    for name, part in parts.items():
        images = [{"bytes": png(s["image"]), "path": None} for s in part]
        if bad_row is not None and name.startswith("train-00000"):
            images[bad_row] = {"bytes": b"not an image", "path": None}
        table = pa.table({"image": images, "label": [s["label"] for s in part], "caption": [s["caption"] for s in part]})
        pq.write_table(table.replace_schema_metadata(metadata), root / "data" / f"{name}.parquet", row_group_size=2)
    return samples


def take(loader, n):
    return list(itertools.islice(loader, n))


def test_splits_labels_captions_and_class_names(tmp_path):
    samples = write_parquet_dataset(tmp_path / "copy")
    train = build_dataset(f"hf:{tmp_path / 'copy'}", 16)
    assert isinstance(train, ShardDataset) and isinstance(train, HubDataset)
    assert [Path(p).name for p in train.shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert train.class_names == CLASSES and train.num_classes == 10
    seen = []
    for batch in take(build_loader(train, 5), 2):  # one epoch: 10 samples
        for image, label, caption in zip(batch["image"], batch["label"], batch["caption"], strict=True):
            assert torch.equal(image, samples[caption]["image"]) and label == samples[caption]["label"]
            seen.append(caption)
    assert len(set(seen)) == 10
    assert len(build_dataset(f"hf:{tmp_path / 'copy'}:validation", 16).shards) == 1
    assert parse_hf_spec("hf:ILSVRC/imagenet-1k") == ("ILSVRC/imagenet-1k", "train")
    with pytest.raises(ValueError, match="has no parquet files for split 'test'"):
        build_dataset(f"hf:{tmp_path / 'copy'}:test", 16)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_and_ranks_as_for_shards(tmp_path, num_workers):
    write_parquet_dataset(tmp_path / "copy")
    dataset = build_dataset(f"hf:{tmp_path / 'copy'}", 16, hflip=True)
    captions = []
    for rank in (0, 1):
        options = {"rank": rank, "world_size": 2, "seed": 7, "num_workers": num_workers}
        straight = take(build_loader(dataset, 2, **options), 6)  # beyond one epoch of each reader
        captions.append({c for batch in straight for c in batch["caption"]})
        for step in (1, 4):
            resumed = take(build_loader(dataset, 2, start_step=step, **options), 2)
            for got, expected in zip(resumed, straight[step : step + 2], strict=True):
                assert torch.equal(got["image"], expected["image"]) and got["caption"] == expected["caption"]
    if num_workers == 0:
        assert not captions[0] & captions[1]  # with one reader per rank, the ranks read different files


def test_cache_latents_reads_one_unit_per_file_and_skips_bad_images(tmp_path):
    write_parquet_dataset(tmp_path / "copy", bad_row=1)
    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 8, [1, 2, 2], 4
    torch.manual_seed(0)
    AlignTokTokenizer.from_config(cfg).save_pretrained(tmp_path / "tok")
    result = cache_latents(tmp_path / "tok", f"hf:{tmp_path / 'copy'}", tmp_path / "cache", resolution=16,
                           batch_size=4, num_workers=0, progress=False)
    meta = result.metadata
    assert meta["num_images"] == 9 and meta["skipped_images"] == 1 and meta["num_classes"] == 10
    assert [s["images"] for s in meta["shards"]] == [4, 5]


def test_a_hub_dataset_id_reads_the_local_cache_offline(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "datasets--tiny-org--tiny-imagenet"
    write_parquet_dataset(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = ("from aligntok.data import build_dataset; d = build_dataset('hf:tiny-org/tiny-imagenet:validation', 16);"
              "print(len(d.shards), d.shard_size(d.shards[0]), d.num_classes)")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.stdout.split() == ["1", "4", "10"], done.stderr[-2000:]
