"""Tests of the data layer: built-in shapes, robust decoding, ADM crop, loaders, resume and shards."""

from __future__ import annotations

import io
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from webdataset import TarWriter

from aligntok.data import (
    BadImageError,
    ImageFolderDataset,
    SampleKey,
    ShapesDataset,
    ShardDataset,
    build_dataset,
    build_loader,
    center_crop,
    load_image,
    write_shards,
)
from aligntok.data import images as images_module
from aligntok.data.builtin import (
    DIFFICULTIES,
    SHAPE_NAMES,
    make_scene,
    render_scene,
    render_shapes,
    shapes_difficulty,
)


def take(iterator, count: int) -> list[dict]:
    return list(itertools.islice(iterator, count))


def assert_batches_equal(a: dict, b: dict) -> None:
    assert torch.equal(a["image"], b["image"])
    assert torch.equal(a["label"], b["label"])
    assert torch.equal(a["index"], b["index"])
    assert a["caption"] == b["caption"] and a["skipped"] == b["skipped"]


# ---------------------------------------------------------------------------------------------
# builtin:shapes
# ---------------------------------------------------------------------------------------------


def test_shapes_are_deterministic_and_seeded():
    first, again, other = (ShapesDataset(100, 32, seed=s) for s in (0, 0, 1))
    for i in (0, 7, 99):
        assert torch.equal(first[i]["image"], again[i]["image"])
        assert first[i]["caption"] == again[i]["caption"]
    assert not torch.equal(first[7]["image"], other[7]["image"])
    assert first[7]["label"] == other[7]["label"] == 7


@pytest.mark.parametrize("resolution", [32, 48, 64])
def test_shapes_samples_labels_and_captions(resolution):
    dataset = build_dataset("builtin:shapes", resolution, builtin_size=40)
    assert len(dataset) == 40 and dataset.num_classes >= 10 and dataset.class_names == list(SHAPE_NAMES)
    for i in range(0, 40, 3):
        sample = dataset[i]
        image = sample["image"]
        assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.05
        assert sample["label"] == i % dataset.num_classes and sample["index"] == i and sample["skipped"] == []
        assert SHAPE_NAMES[sample["label"]] in sample["caption"] and sample["caption"].startswith("a ")
        # The scene does not depend on resolution: same caption at every size.
        assert sample["caption"] == make_scene(0, i).caption


def test_shapes_class_is_shape_not_colour():
    scenes = [make_scene(0, i) for i in range(300)]
    for label in range(len(SHAPE_NAMES)):
        of_class = [s for s in scenes if s.label == label]
        assert {s.main.kind for s in of_class} == {SHAPE_NAMES[label]}
        assert len({s.main.colour_name for s in of_class}) >= 5
        assert len({s.main.texture for s in of_class}) >= 3
        assert len({s.background for s in of_class}) >= 2


def test_shapes_render_their_geometry():
    """A solid circle's center shows its colour; a ring's center shows the background."""
    scenes = [make_scene(0, i) for i in range(400)]
    plain = [s for s in scenes if s.distractor is None and s.main.texture == "solid" and s.background == "plain"]
    circle = next(s for s in plain if s.main.kind == "circle")
    ring = next(s for s in plain if s.main.kind == "ring")
    for scene, expected in ((circle, circle.main.colour), (ring, ring.background_colours[0])):
        pixels = np.asarray(render_scene(scene, 64), dtype=np.float32)
        x, y = (int(c * 64) for c in scene.main.center)
        assert np.abs(pixels[y, x] - np.rint(expected)).max() <= 1.0


# ---------------------------------------------------------------------------------------------
# Decoding and the bad-file folder
# ---------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_bad_folder(root: Path) -> dict[str, bool]:
    """One file of each awkward kind; returns name -> whether it is convertible."""
    root.mkdir()
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    whole = png_bytes(noise)
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
    Image.fromarray(ramp).save(root / "gray16.png")
    Image.fromarray(np.full((40, 40), 200, np.uint8), mode="L").save(root / "gray.png")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(0, (0, 0, 20, 40))  # left half: index 0, transparent
    palette.save(root / "palette.png", transparency=0)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 20, 40))
    rgba.save(root / "rgba.png")
    Image.new("RGB", (2, 2), (255, 0, 0)).save(root / "tiny.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(root / "bomb.png")  # a bomb under the test limit of 2000
    return {"truncated.png": False, "empty.png": False, "text.jpg": False, "cmyk.jpg": True,
            "gray16.png": True, "gray.png": True, "palette.png": True, "rgba.png": True,
            "tiny.png": False, "bomb.png": False}


@pytest.fixture
def bad_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 2000)
    root = tmp_path / "bad"
    return root, make_bad_folder(root)


def test_load_image_converts_what_it_can(bad_folder):
    root, _ = bad_folder
    cmyk = np.asarray(load_image(root / "cmyk.jpg"), np.int32)
    assert cmyk.shape == (40, 40, 3) and cmyk[20, 20, 0] > 200 and cmyk[20, 20, 1:].max() < 60
    gray16 = np.asarray(load_image(root / "gray16.png"), np.int32)
    assert gray16[0, 0].tolist() == [0, 0, 0] and gray16[0, -1].tolist() == [255, 255, 255]
    assert 110 < gray16[0, 20, 0] < 145  # scaled from 16 bits, not clipped at 255
    assert np.asarray(load_image(root / "gray.png"))[5, 5].tolist() == [200, 200, 200]
    palette = np.asarray(load_image(root / "palette.png"))
    assert palette[5, 5].tolist() == [255, 255, 255] and palette[5, 30].tolist() == [0, 200, 0]
    rgba = np.asarray(load_image((root / "rgba.png").read_bytes()))  # from bytes too
    assert rgba[5, 5].tolist() == [255, 255, 255] and rgba[5, 30].tolist() == [0, 0, 255]


def test_load_image_refuses_bad_files_in_one_line(bad_folder, monkeypatch):
    root, _ = bad_folder
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or original_load(self))
    reasons = {}
    for name in ("truncated.png", "empty.png", "text.jpg", "tiny.png", "bomb.png"):
        with pytest.raises(BadImageError) as caught:
            load_image(root / name)
        reasons[name] = str(caught.value)
        assert "\n" not in reasons[name]
    assert "truncated" in reasons["truncated.png"] and "empty" in reasons["empty.png"]
    assert "not an image" in reasons["text.jpg"] and "too small" in reasons["tiny.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert not any(getattr(image, "filename", "").endswith("bomb.png") for image in decoded)
    with pytest.raises(BadImageError):
        load_image(b"")


def test_bad_files_are_replaced_and_listed(bad_folder):
    root, convertible = bad_folder
    dataset = build_dataset(str(root), 16)
    assert isinstance(dataset, ImageFolderDataset) and dataset.num_classes == 0
    names = [Path(p).name for p in dataset.paths]
    assert sorted(names) == sorted(convertible)
    skipped_names = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image"].shape == (3, 16, 16) and sample["image"].abs().max() <= 1
        assert sample["label"] == -1 and convertible[names[sample["index"]]]
        if convertible[names[i]]:
            assert sample["index"] == i and sample["skipped"] == []
        for entry in sample["skipped"]:
            path, reason = entry.split(": ", 1)
            skipped_names.add(Path(path).name)
            assert reason and "\n" not in entry
    assert skipped_names == {n for n, ok in convertible.items() if not ok}
    batch = next(build_loader(dataset, len(dataset), seed=3))
    assert batch["image"].shape == (len(dataset), 3, 16, 16)
    assert {Path(e.split(": ")[0]).name for e in batch["skipped"]} == skipped_names


def test_all_bad_folder_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope")
    with pytest.raises(ValueError, match=r"all 2 images .* are unreadable"):
        build_dataset(str(tmp_path), 16)[0]


# ---------------------------------------------------------------------------------------------
# Folders, specs, crop
# ---------------------------------------------------------------------------------------------


def test_class_folders_give_sorted_labels_and_captions(tmp_path):
    for folder, colour in (("zebra", (0, 0, 0)), ("apple", (255, 0, 0))):
        (tmp_path / folder / "nested").mkdir(parents=True)
        Image.new("RGB", (20, 30), colour).save(tmp_path / folder / "one.png")
        Image.new("RGB", (30, 20), colour).save(tmp_path / folder / "nested" / "two.jpg")
    (tmp_path / "apple" / "one.txt").write_text("a red square\n")
    dataset = build_dataset(str(tmp_path), 16)
    assert dataset.class_names == ["apple", "zebra"] and dataset.num_classes == 2
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    assert labels == [0, 0, 1, 1]
    assert dataset[0]["caption"] == "a red square" and dataset[1]["caption"] == ""
    assert dataset[0]["image"][0].mean() == 1.0 and dataset[2]["image"].max() == -1.0


def test_a_link_back_to_the_root_reads_each_real_folder_once_with_its_label(tmp_path):
    for folder, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / folder).mkdir()
        for name in ("a.png", "b.png"):
            Image.new("RGB", (16, 16), colour).save(tmp_path / folder / name)
    (tmp_path / "cat" / "up").symlink_to("..", target_is_directory=True)  # cat/up -> the root
    (tmp_path / "dog" / "same").symlink_to(tmp_path / "dog", target_is_directory=True)  # a folder's link to itself
    dataset = build_dataset(str(tmp_path), 16)
    assert dataset.class_names == ["cat", "dog"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in dataset.paths] == [
        "cat/a.png", "cat/b.png", "dog/a.png", "dog/b.png"]
    assert dataset.labels == [0, 0, 1, 1]


def test_linked_folders_outside_the_root_are_still_read(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert len(build_dataset(str(tmp_path / "data"), 16)) == 1


def test_a_file_deleted_after_listing_is_skipped_not_fatal(tmp_path):
    (tmp_path / "cat").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 16)).save(tmp_path / "cat" / f"{name}.png")
        (tmp_path / "cat" / f"{name}.txt").write_text(name)
    dataset = build_dataset(str(tmp_path), 16)
    (tmp_path / "cat" / "a.png").unlink()  # image and caption gone mid-epoch
    (tmp_path / "cat" / "b.txt").unlink()  # only the caption gone
    sample = dataset[0]
    assert sample["index"] == 2 and sample["caption"] == "c"
    assert [s.split(":")[0] for s in sample["skipped"]] == [str(tmp_path / "cat" / "a.png"), str(tmp_path / "cat" / "b.png")]
    assert "caption" in sample["skipped"][1]


def test_shard_writer_converts_pil_images_like_the_readers(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent: white, as load_image reads it
    write_shards([{"image": rgba, "label": 0}], str(tmp_path / "%06d.tar"), maxcount=4)
    sample = next(iter(ShardDataset(str(tmp_path / "000000.tar"), 16)))
    assert (sample["image"] == 1.0).all()


def test_bad_specs_are_one_line_errors(tmp_path):
    for spec, message in (("no/such/place", "none of"), ("builtin:nope", "unknown built-in"),
                          (str(tmp_path / "missing_{000..003}.tar"), "not found")):
        with pytest.raises(ValueError, match=message) as caught:
            build_dataset(spec, 16)
        assert "\n" not in str(caught.value)
    (tmp_path / "classA").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="mixes images"):
        build_dataset(str(tmp_path), 16)
    with pytest.raises(ValueError, match="no images"):
        build_dataset(str(tmp_path / "classA"), 16)


def test_adm_center_crop_on_non_square_images():
    # Landscape 300x100 to 50: halve once (short side 100 >= 2*50) to 150x50, then crop columns 50..99.
    columns = np.tile(np.arange(300, dtype=np.uint8), (100, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    cropped = np.asarray(center_crop(image, 50))
    halved = columns.reshape(100, 150, 2).astype(np.float64).mean(axis=2).reshape(50, 2, 150).mean(axis=1)
    assert cropped.shape == (50, 50, 3)
    assert np.abs(cropped[..., 0].astype(np.float64) - halved[:, 50:100]).max() <= 1
    # Portrait 80x120 to 64: no halving, bicubic to 64x96, crop rows 16..79 (the middle two thirds).
    rows = np.repeat(np.arange(120, dtype=np.uint8)[:, None], 80, axis=1)
    cropped = np.asarray(center_crop(Image.fromarray(rows), 64))
    assert cropped.shape == (64, 64)
    resized = np.asarray(Image.fromarray(rows).resize((64, 96), Image.Resampling.BICUBIC))
    assert np.array_equal(cropped, resized[16:80])
    assert center_crop(image, 100).size == (100, 100)


# ---------------------------------------------------------------------------------------------
# Loader: order, ranks, resume
# ---------------------------------------------------------------------------------------------


def test_stream_is_made_of_seeded_epoch_permutations():
    dataset = ShapesDataset(13, 16)
    indices = torch.cat([b["index"] for b in take(build_loader(dataset, 13, seed=5), 3)])
    epochs = indices.view(3, 13)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(13))
    assert not torch.equal(epochs[0], epochs[1])
    other_seed = next(build_loader(dataset, 13, seed=6))["index"]
    assert not torch.equal(other_seed, epochs[0])


def test_one_rank_sees_the_union_of_two_ranks():
    dataset = ShapesDataset(23, 16, hflip=True)
    single = take(build_loader(dataset, 6, seed=1), 6)  # 36 samples: crosses epoch boundaries
    halves = [take(build_loader(dataset, 3, rank=r, world_size=2, seed=1), 6) for r in (0, 1)]
    for step, batch in enumerate(single):
        joined = {key: torch.cat([halves[0][step][key], halves[1][step][key]])
                  for key in ("image", "label", "index")}
        assert torch.equal(batch["index"], joined["index"])
        assert torch.equal(batch["image"], joined["image"])
        assert torch.equal(batch["label"], joined["label"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reproduces_batches_bitwise(num_workers):
    dataset = ShapesDataset(11, 16, hflip=True)
    straight = take(build_loader(dataset, 4, seed=2, num_workers=0), 6)
    for step in (1, 4):
        resumed = take(build_loader(dataset, 4, seed=2, num_workers=num_workers, start_step=step), 2)
        assert_batches_equal(resumed[0], straight[step])
        assert_batches_equal(resumed[1], straight[step + 1])


def test_flip_depends_on_epoch_and_index_only():
    flipping, plain = ShapesDataset(11, 16, hflip=True), ShapesDataset(11, 16)
    outcomes = set()
    for index, epoch in itertools.product(range(11), range(3)):
        image = flipping[SampleKey(index, epoch)]["image"]
        reference = plain[index]["image"]
        flipped = torch.equal(image, reference.flip(-1))
        assert flipped or torch.equal(image, reference)
        outcomes.add(flipped)
        assert torch.equal(image, flipping[SampleKey(index, epoch)]["image"])
    assert outcomes == {True, False}


def test_loader_rejects_bad_arguments():
    dataset = ShapesDataset(8, 16)
    for kwargs in ({"batch_size": 0}, {"batch_size": 2, "rank": 2, "world_size": 2},
                   {"batch_size": 2, "start_step": -1}):
        with pytest.raises(ValueError):
            build_loader(dataset, **kwargs)


# ---------------------------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path):
    source = ShapesDataset(20, 16, seed=4)
    samples = [source[i] for i in range(20)]
    paths = write_shards(samples, str(tmp_path / "shards" / "%06d.tar"), 6, class_names=list(SHAPE_NAMES))
    return str(tmp_path / "shards" / "{000000..000003}.tar"), samples, paths


def test_shards_round_trip_labels_and_captions(shards):
    spec, samples, paths = shards
    assert [Path(p).name for p in paths] == [f"{i:06d}.tar" for i in range(4)]
    meta = json.loads((Path(paths[0]).parent / "dataset.json").read_text())
    assert meta["num_samples"] == 20 and meta["shard_sizes"]["000003.tar"] == 2
    dataset = build_dataset(spec, 16)
    assert isinstance(dataset, ShardDataset) and dataset.num_classes == 10
    by_caption = {s["caption"]: s for s in samples}
    seen = []
    for batch in take(build_loader(dataset, 5), 4):  # one epoch: 20 samples
        columns = (batch["image"], batch["label"], batch["caption"], batch["index"])
        for image, label, caption, index in zip(*columns, strict=True):
            original = by_caption[caption]
            assert torch.equal(image, original["image"]) and label == original["label"] and index == -1
            seen.append(caption)
    assert sorted(seen) == sorted(by_caption)
    assert build_dataset(paths[0], 16).shards == [paths[0]]  # one .tar path is a spec too


def test_a_truncated_shard_keeps_every_sample_before_the_damage_and_counts_what_it_reads(tmp_path):
    from aligntok.data.shards import _count_samples, _read_shard

    whole = tmp_path / "whole.tar"
    with TarWriter(str(whole)) as sink:
        for key in ("a", "b"):
            sink.write({"__key__": key, "bin": np.random.default_rng(0).bytes(3000), "cls": b"1"})
    data = whole.read_bytes()
    for cut, expected in ((len(data), ["a", "b"]), (6120, ["a"]), (100, [])):  # 6120: inside b's first file
        cut_file = tmp_path / f"cut{cut}.tar"
        cut_file.write_bytes(data[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keys = [sample["__key__"] for sample in _read_shard(str(cut_file))]
        assert keys == expected and _count_samples(str(cut_file)) == len(expected)
        assert bool(caught) == (cut < len(data) - 1024)  # a warning for the damage (not for the end padding)


@pytest.mark.parametrize("layout", ["shard_per_reader", "no_metadata", "shared_shard"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_resume_reproduces_batches(shards, num_workers, layout):
    spec, _, paths = shards
    if layout == "no_metadata":  # epoch lengths then come from the tar headers
        (Path(paths[0]).parent / "dataset.json").unlink()
    if layout == "shared_shard":  # fewer shards than readers: readers split one shard's samples
        spec = paths[0]
    dataset = build_dataset(spec, 16, hflip=True)
    for rank in (0, 1):
        options = {"rank": rank, "world_size": 2, "seed": 7, "num_workers": num_workers}
        straight = take(build_loader(dataset, 3, **options), 7)  # beyond one epoch of each reader
        for step in (2, 5):
            resumed = take(build_loader(dataset, 3, start_step=step, **options), 2)
            assert_batches_equal(resumed[0], straight[step])
            assert_batches_equal(resumed[1], straight[step + 1])


def test_shard_readers_partition_each_epoch(shards):
    """Within one epoch the readers (ranks x workers) see disjoint samples that cover the data."""
    _, _, paths = shards
    for spec, expected in ((str(Path(paths[0]).parent / "{000000..000003}.tar"), 20), (paths[0], 6)):
        dataset = build_dataset(spec, 16)
        seen = []
        for reader in range(4):
            length = dataset.reader_epoch_length(reader, 4)
            seen += [s["caption"] for s in itertools.islice(dataset.reader_stream(reader, 4, 0), length)]
        assert len(seen) == expected and len(set(seen)) == expected


def test_bad_shard_samples_are_replaced_and_listed(tmp_path):
    good = png_bytes(Image.new("RGB", (16, 16), (10, 20, 30)))
    with TarWriter(str(tmp_path / "000000.tar")) as writer:
        writer.write({"__key__": "a", "png": good, "cls": b"3", "txt": b"first"})
        writer.write({"__key__": "b", "png": b"garbage", "cls": b"4"})
        writer.write({"__key__": "c", "png": good, "cls": b"5", "txt": b"third"})
    dataset = build_dataset(str(tmp_path / "000000.tar"), 16)
    batch = next(build_loader(dataset, 6))
    assert batch["image"].shape == (6, 3, 16, 16)
    assert batch["label"].tolist().count(4) == 0
    assert batch["skipped"] and all(e.endswith("/b: not an image (PIL cannot identify the format)")
                                    for e in batch["skipped"])
    with TarWriter(str(tmp_path / "000001.tar")) as writer:
        writer.write({"__key__": "x", "png": b"garbage"})
    with pytest.raises(ValueError, match="no readable image"):
        next(iter(build_dataset(str(tmp_path / "000001.tar"), 16)))


def test_write_shards_rejects_bad_patterns(tmp_path):
    with pytest.raises(ValueError, match="integer field"):
        write_shards([{"image": Image.new("RGB", (8, 8))}], str(tmp_path / "shard.tar"), 10)


def test_standard_difficulty_draws_the_scenes_of_earlier_versions():
    # Pinned draws (numpy's PCG64 stream is stable): adding difficulty presets changed no standard scene.
    expected = [("solid", "plain", None, 0.212568), ("speckled", "plain", "circle", 0.334616),
                ("solid", "noisy", "ring", 0.334857), ("checkered", "gradient", None, 0.279235)]
    for index, (texture, background, distractor, radius) in enumerate(expected):
        scene = make_scene(3, index)
        assert (scene.main.texture, scene.background) == (texture, background)
        assert (scene.distractor.kind if scene.distractor else None) == distractor
        assert scene.main.radius == pytest.approx(radius, abs=1e-6)


def test_centered_difficulty_is_a_subset_of_easy_with_the_same_later_draws():
    centered = DIFFICULTIES["centered"]
    scenes = [make_scene(0, i, difficulty="centered") for i in range(200)]
    assert {s.main.texture for s in scenes} == {"solid"} and {s.background for s in scenes} == {"plain"}
    assert all(s.distractor is None for s in scenes)
    lo, hi = centered.radius
    assert all(lo <= s.main.radius <= hi for s in scenes) and lo >= DIFFICULTIES["easy"].radius[0]
    offsets = np.array([s.main.center for s in scenes]) - 0.5
    assert np.abs(offsets).max() <= centered.center_jitter and np.abs(offsets).std() > 0.01
    # the shape fits inside the image, as in every preset
    assert all(min(c) - s.main.radius >= 0 and max(c) + s.main.radius <= 1 for s in scenes for c in [s.main.center])
    # Pose and colour come from the same draws as in "easy": only the preset's own factors differ.
    easy = make_scene(0, 5, difficulty="easy")
    assert scenes[5].main.rotation == easy.main.rotation and scenes[5].main.colour_name == easy.main.colour_name
    assert all(" on a plain " in s.caption and "small" not in s.caption for s in scenes)
    assert shapes_difficulty("builtin:shapes-centered") == "centered"


def test_easy_difficulty_and_its_data_spec():
    easy = DIFFICULTIES["easy"]
    scenes = [make_scene(0, i, difficulty="easy") for i in range(200)]
    assert {s.main.texture for s in scenes} == set(easy.textures) == {"solid"}
    assert {s.background for s in scenes} == {"plain", "gradient"} and all(s.distractor is None for s in scenes)
    assert [s.label for s in scenes[:10]] == list(range(10))  # classes stay balanced
    dataset = build_dataset("builtin:shapes-easy", 32, builtin_size=20)
    assert isinstance(dataset, ShapesDataset) and dataset.difficulty == "easy"
    image, label, caption = dataset.load(3)
    assert label == 3 and "polka-dot" not in caption and "next to" not in caption
    images, labels = render_shapes(4, 32, seed=0, difficulty="easy")
    assert np.array_equal(images[3].permute(1, 2, 0).numpy(), np.asarray(image))
    assert shapes_difficulty("builtin:shapes") == "standard" and shapes_difficulty("builtin:shapes-easy") == "easy"
    assert shapes_difficulty("builtin:shapes-nope") is None and shapes_difficulty("/data/imagenet") is None
    with pytest.raises(ValueError, match="unknown built-in dataset 'builtin:shapes-nope'"):
        build_dataset("builtin:shapes-nope", 32)
    with pytest.raises(ValueError, match="unknown builtin:shapes difficulty 'hard'"):
        make_scene(0, 0, difficulty="hard")
