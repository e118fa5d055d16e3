"""Aspect-ratio buckets: the table, assignment without decoding, and the resumable one-bucket-per-step sampler."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from aligntok.data.buckets import (
    BucketBatchSampler,
    BucketedImages,
    assign_buckets,
    bucket_table,
    cover_crop,
    image_sizes,
    shard_sizes,
)


def test_bucket_table_constant_area_multiples_and_dedupe():
    table = bucket_table(256)
    assert (256, 256) in table and (288, 224) in table and (224, 288) in table  # 4:5 is w:h 224x288
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in table)
    assert all(abs(h * w / 256**2 - 1) < 0.1 for h, w in table)
    assert len(table) == len(set(table)) < 9  # 4:3 and 5:4 collapse at 256 px
    assert all(abs(h * w / 512**2 - 1) < 0.05 for h, w in bucket_table(512))
    with pytest.raises(ValueError, match="W/H"):
        bucket_table(256, ["wide"])


def test_assignment_by_nearest_ratio():
    table = bucket_table(256, ["1:1", "16:9", "9:16"])
    ids = assign_buckets([(100, 100), (1920, 1080), (300, 500), (1000, 900)], table)
    assert [table[i] for i in ids] == [(256, 256), (192, 336), (336, 192), (256, 256)]


def test_sampler_never_mixes_buckets_and_ranks_share_the_bucket():
    bucket_ids = [i % 3 for i in range(60)] + [0] * 7
    one = BucketBatchSampler(bucket_ids, 4, seed=1)
    ranks = [BucketBatchSampler(bucket_ids, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    streams = [iter(one), *map(iter, ranks)]
    seen = []
    for _ in range(2 * one.batches_per_epoch):
        whole, a, b = (next(s) for s in streams)
        assert a + b == whole  # one process at batch 2B = two ranks at B
        assert len({bucket_ids[k.index] for k in whole}) == 1
        seen += [(k.epoch, k.index) for k in whole]
    assert len(seen) == len(set(seen))  # no sample twice within an epoch


def test_sampler_resumes_exactly_after_a_kill():
    bucket_ids = [i % 4 for i in range(90)]
    full = iter(BucketBatchSampler(bucket_ids, 3, seed=5))
    reference = [next(full) for _ in range(25)]
    resumed = iter(BucketBatchSampler(bucket_ids, 3, seed=5, start_step=11))  # a fresh process at step 11
    assert [next(resumed) for _ in range(14)] == reference[11:]
    with pytest.raises(ValueError, match="no bucket holds"):
        BucketBatchSampler([0, 1], 2)


def test_sizes_from_headers_and_shard_json_without_decoding(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20)).save(tmp_path / "a.png")
    assert image_sizes([str(tmp_path / "a.png")]) == [(40, 20)]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, meta, image in [("000000000", {"width": 64, "height": 48}, b"not a jpeg at all"),
                                 ("000000001", {"caption": "no size"}, b""),
                                 ("000000002", b"{bad json", b"")]:
            for ext, data in (("jpg", image), ("json", meta if isinstance(meta, bytes) else json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert shard_sizes(tmp_path / "00000.tar") == [("000000000", 64, 48)]  # the corrupt jpg is never opened


def test_bucketed_images_crop_to_the_bucket_and_flip_captions(tmp_path):
    from PIL import Image

    from aligntok.data import build_dataset
    from aligntok.data.images import SampleKey, should_flip

    Image.new("RGB", (90, 50), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (30, 60)).save(tmp_path / "tall.png")
    (tmp_path / "wide.txt").write_text("a cat left of a dog")
    base = build_dataset(str(tmp_path), 32)
    table = bucket_table(32, ["1:1", "2:1", "1:2"])
    ids = assign_buckets(image_sizes(base.paths), table)
    data = BucketedImages(base, table, ids, hflip=True, seed=0)
    assert base.paths[1].endswith("wide.png")
    assert tuple(data[0]["image"].shape[1:]) == (48, 16) and tuple(data[1]["image"].shape[1:]) == (16, 48)
    epoch = next(e for e in range(20) if should_flip(0, e, 1))
    assert data[SampleKey(1, epoch)]["caption"] == "a cat left of a dog"  # web captions are not rewritten
    assert cover_crop(Image.new("RGB", (90, 50)), 16, 48).size == (48, 16)


def test_written_shards_carry_sizes_in_json_like_img2dataset(tmp_path):
    from PIL import Image

    from aligntok.data import build_dataset, write_shards

    samples = [{"image": Image.new("RGB", (40 + 8 * i, 24)), "caption": f"picture {i}"} for i in range(3)]
    paths = write_shards(samples, str(tmp_path / "%06d.tar"), maxcount=10)
    assert [(w, h) for _, w, h in shard_sizes(paths[0])] == [(40, 24), (48, 24), (56, 24)]
    first = next(build_dataset(str(tmp_path / "{000000..000000}.tar"), 16).reader_stream(0, 1, 0))
    assert first["caption"].startswith("picture")  # the txt caption still reads back


def test_indexed_shards_give_random_access_and_json_sizes(tmp_path):
    from PIL import Image

    from aligntok.data import write_shards
    from aligntok.data.buckets import IndexedShards
    from aligntok.data.images import BadImageError

    samples = [{"image": Image.new("RGB", (32 + 16 * (i % 2), 32), (40 * i, 0, 0)), "caption": f"picture {i}"}
               for i in range(5)]
    write_shards(samples, str(tmp_path / "%06d.tar"), maxcount=3)
    with tarfile.open(tmp_path / "000002.tar", "w") as tar:  # img2dataset-style sample with a corrupt jpg
        for ext, data in (("jpg", b"garbage"), ("txt", b"broken"), ("json", json.dumps({"width": 48, "height": 32}).encode())):
            info = tarfile.TarInfo(f"000000099.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards = IndexedShards(str(tmp_path / "{000000..000002}.tar"), 32)
    assert len(shards) == 6
    assert shards.sizes() == [(32, 32), (48, 32), (32, 32), (48, 32), (32, 32), (48, 32)]  # the jpg is never decoded
    image, _, caption = shards.load(3)
    assert caption == "picture 3" and image.size == (48, 32) and image.getpixel((0, 0)) == (120, 0, 0)
    with pytest.raises(BadImageError):
        shards.load(5)
    table = bucket_table(32, ["1/1", "2/1"])
    data = BucketedImages(shards, table, assign_buckets(shards.sizes(), table), hflip=False, seed=0)
    assert data[5]["skipped"] and data[5]["caption"] == "picture 0"  # replaced by the next of its bucket
