"""The uint8 conversion, ADM .npz / PNG-folder readers and writers, and provenance helpers."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.data.images import load_image
from aligntok.eval import (
    build_provenance,
    from_uint8,
    open_images,
    read_images,
    read_npz_statistics,
    save_npz,
    save_png_folder,
    sha256_file,
    software_versions,
    to_uint8,
    to_uint8_nhwc,
)


def _images(n: int = 5, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, -1.0 + 0.4 / 127.5, -1.0 + 0.6 / 127.5, 0.0, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 1, 128, 255, 255]  # 127.5 rounds half to even: 128


def test_to_uint8_inverts_from_uint8_on_every_level():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(levels)), levels)
    assert torch.equal(to_uint8(from_uint8(levels).to(torch.bfloat16)), levels)  # bf16 is exact enough


def test_to_uint8_rejects_bad_input():
    with pytest.raises(ValueError, match="float tensor"):
        to_uint8(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN or inf"):
        to_uint8(torch.tensor([0.0, float("nan")]))


def test_to_uint8_nhwc_layout():
    x = torch.rand(2, 3, 4, 5) * 2 - 1
    out = to_uint8_nhwc(x)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert np.array_equal(out, to_uint8(x).permute(0, 2, 3, 1).numpy())


def test_npz_and_png_folder_read_to_the_same_arrays(tmp_path):
    images = _images()
    paths = save_png_folder(images, tmp_path / "pngs")
    assert all(p.suffix == ".png" for p in paths)
    save_npz(images, tmp_path / "samples.npz", labels=np.arange(5))
    from_npz, from_pngs = read_images(tmp_path / "samples.npz"), read_images(tmp_path / "pngs")
    assert from_npz.dtype == np.uint8 and np.array_equal(from_npz, images)
    assert np.array_equal(from_pngs, images)
    with np.load(tmp_path / "samples.npz") as data:  # ADM layout: arr_0 images, arr_1 labels
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], np.arange(5))


def test_npz_batches_stream_in_order_with_a_ragged_tail(tmp_path):
    images = _images(n=7)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)  # compressed members are streamed too
    source = open_images(tmp_path / "c.npz")
    assert (source.kind, len(source), source.height, source.width) == ("npz", 7, 12, 16)
    batches = list(source.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert np.array_equal(np.concatenate(batches), images)
    batches[0][0, 0, 0, 0] = 0  # batches are writable (torch.from_numpy needs that)


def test_png_folder_is_read_recursively_in_name_order(tmp_path):
    images = _images(n=4)
    save_png_folder(images[:2], tmp_path / "a")
    save_png_folder(images[2:], tmp_path / "b")
    assert np.array_equal(read_images(tmp_path), images)


def test_adm_reference_statistics_are_read(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "ref.npz", arr_0=_images(n=2), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    loaded = read_npz_statistics(tmp_path / "ref.npz")
    assert loaded is not None and np.array_equal(loaded[0], mu) and np.array_equal(loaded[1], sigma)
    np.savez(tmp_path / "plain.npz", arr_0=_images(n=2))
    assert read_npz_statistics(tmp_path / "plain.npz") is None


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"arr_0": np.zeros((2, 3, 8, 8), np.float32)}, r"arr_0 must be uint8 images \(N, H, W, 3\), got float32"),
        ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, r"no 'arr_0' array \(arrays found: images\)"),
        ({"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, "holds no images"),
    ],
)
def test_bad_npz_files_are_one_line_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        open_images(tmp_path / "bad.npz")
    assert "\n" not in str(info.value)


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        open_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        open_images(tmp_path / "empty")
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid .npz"):
        open_images(tmp_path / "x.npz")
    mixed = tmp_path / "mixed"
    save_png_folder(_images(n=1), mixed)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(mixed / "zz.png")
    with pytest.raises(ValueError, match="zz.png: image is 5x5, expected 16x12"):
        read_images(mixed)
    (mixed / "zz.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="zz.png: cannot decode"):
        read_images(mixed)


def test_writers_reject_non_uint8_nhwc(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        save_png_folder(np.zeros((1, 3, 8, 8), np.uint8), tmp_path)
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        save_npz(np.zeros((1, 8, 8, 3), np.float32), tmp_path / "x.npz")


def test_grayscale_16_bit_and_alpha_pngs_become_rgb_as_the_training_reader_reads_them(tmp_path):
    Image.fromarray(np.full((12, 16), 7, np.uint8)).save(tmp_path / "a.png")
    transparent = np.zeros((12, 16, 4), np.uint8)  # black where fully transparent
    transparent[:, :8] = (200, 0, 0, 255)  # opaque red on the left half
    Image.fromarray(transparent).save(tmp_path / "b.png")
    Image.fromarray(np.full((12, 16), 32768, np.uint16)).save(tmp_path / "c.png")  # 16-bit mid grey
    assert Image.open(tmp_path / "c.png").mode == "I;16"
    images = read_images(tmp_path)
    assert images.shape == (3, 12, 16, 3)
    assert (images[0] == 7).all()
    assert (images[1][:, :8] == (200, 0, 0)).all() and (images[1][:, 8:] == 255).all()  # over white, not black
    assert (images[2] == 128).all()  # 32768 / 65535 of white, not clipped to 255
    for image, name in zip(images, ("a", "b", "c"), strict=True):  # one decoder: training reads the same pixels
        assert np.array_equal(image, np.asarray(load_image(tmp_path / f"{name}.png")))


def test_a_folder_with_a_link_back_to_itself_is_read_once(tmp_path):
    save_png_folder(_images(n=2), tmp_path / "s" / "a")
    os.symlink("..", tmp_path / "s" / "a" / "up")
    assert len(open_images(tmp_path / "s")) == 2


def test_provenance_records_hashes_and_versions(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"weights" * 1000).hexdigest()
    versions = software_versions()
    for name in ("python", "torch", "torch-fidelity", "aligntok", "numpy"):
        assert versions[name], name
    record = build_provenance(
        num_samples=3, reference={"path": "r"}, feature_networks=[{"name": "n"}], settings={"k": 1}
    )
    assert record["num_samples"] == 3 and record["feature_networks"] == [{"name": "n"}]
    assert record["settings"] == {"k": 1} and record["device"] == "cpu" and record["timestamp_utc"]
