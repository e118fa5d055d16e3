"""evaluate t2i: CLIP score and PickScore with a tiny random CLIP built here, HPSv2 with a tiny OpenCLIP, FID with a
random Inception."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.cli import main
from aligntok.eval.geneval import write_geneval_folder
from aligntok.eval.t2i import clip_score, read_t2i_samples
from aligntok.models.word_tokenizer import word_level_tokenizer

PROMPTS = ["a red circle", "a blue square", "two green crosses", "a red circle"]


@pytest.fixture
def clip_dir(tmp_path) -> Path:
    """A random CLIPModel (32 px, 8-d projection) with a word-level tokenizer and an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = word_level_tokenizer(" ".join(PROMPTS).split(), model_max_length=16)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 1, "pad_token_id": 0,
                     "bos_token_id": 0},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    directory = tmp_path / "clip"
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _images(n: int, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def _sample_folder(root: Path, images: np.ndarray) -> Path:
    root.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"{i:05d}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "grid.png")  # sample-t2i's grid is not a sample
    return root


def _direct_cosines(clip_dir: Path, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Cosines through the towers and projections called one by one (not CLIPModel.forward)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    text = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(clip_dir)(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = model.text_projection(
            model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output)
    return torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1).double().numpy()


def test_clip_score_of_identical_embeddings_is_100_and_of_orthogonal_or_opposite_ones_0():
    a = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 4.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    torch.testing.assert_close(clip_score(a, b), torch.tensor([100.0, 0.0, 0.0]))
    half = clip_score(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 3.0**0.5]]))  # 60 degrees
    torch.testing.assert_close(half, torch.tensor([50.0]))
    with pytest.raises(ValueError, match="one shape"):
        clip_score(a, b[:2])


def test_evaluate_t2i_clip_score_and_pickscore_match_the_towers(clip_dir, tmp_path):
    images = _images(4)
    samples = _sample_folder(tmp_path / "samples", images)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "t2i.json"
    assert main(["evaluate", "t2i", "--samples", str(samples), "--prompts", str(tmp_path / "prompts.txt"),
                 "--clip", str(clip_dir), "--pickscore", str(clip_dir), "--batch-size", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cos = _direct_cosines(clip_dir, images, PROMPTS)
    assert result["num_images"] == 4 and result["num_prompts"] == 3
    assert result["clip_score"] == pytest.approx(np.mean(100 * np.maximum(cos, 0)), abs=1e-4)
    logit_scale = float(np.exp(2.6592))  # CLIP's initial temperature, kept by a random model
    assert result["pickscore"] == pytest.approx(logit_scale * cos.mean(), rel=1e-4, abs=1e-4)
    provenance = result["provenance"]
    assert provenance["settings"]["captions"]["sha256"] and provenance["feature_networks"][0]["weights_sha256"]
    assert "fid" not in result


def test_prompts_come_from_sampling_json_or_geneval_metadata_and_counts_must_match(tmp_path, capsys):
    samples = _sample_folder(tmp_path / "flat", _images(2))
    with pytest.raises(ValueError, match="no sampling.json"):
        read_t2i_samples(samples)
    (samples / "sampling.json").write_text(json.dumps({"prompts": PROMPTS[:2]}))
    files, prompts = read_t2i_samples(samples)
    assert [f.name for f in files] == ["00000.png", "00001.png"] and prompts == PROMPTS[:2]
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert main(["evaluate", "t2i", "--samples", str(samples), "--prompts", str(tmp_path / "three.txt"),
                 "--clip", "unused", "--out", str(tmp_path / "x.json")]) == 2
    assert "holds 2 images but 3 prompts" in capsys.readouterr().err

    metadata = [{"tag": "single_object", "prompt": "a red circle"}, {"tag": "colors", "prompt": "a blue square"}]
    write_geneval_folder(tmp_path / "geneval", metadata, _images(6))
    files, prompts = read_t2i_samples(tmp_path / "geneval")
    assert prompts == ["a red circle"] * 3 + ["a blue square"] * 3
    assert [f.relative_to(tmp_path / "geneval").as_posix() for f in files[2:4]] == ["00000/samples/0002.png",
                                                                                      "00001/samples/0000.png"]


def test_fid_against_references_records_its_protocol(clip_dir, tmp_path, inception_file):
    samples = _sample_folder(tmp_path / "samples", _images(4))
    (samples / "sampling.json").write_text(json.dumps({"prompts": PROMPTS}))
    refs = _sample_folder(tmp_path / "refs", _images(5, seed=1))
    (refs / "grid.png").unlink()
    out = tmp_path / "t2i.json"
    assert main(["evaluate", "t2i", "--samples", str(samples), "--ref", str(refs), "--inception-weights",
                 str(inception_file), "--offline", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fid"] is not None and np.isfinite(result["fid"]) and "clip_score" not in result
    protocol = result["provenance"]["settings"]["fid_protocol"]
    assert protocol["num_captions"] == 4 and protocol["sample_size"] == [32, 32]
    assert result["generation"]["num_samples"] == 4  # grid.png left out
    assert protocol["reference"]["num_images"] == 5


def test_nothing_to_measure_is_a_one_line_error(tmp_path, capsys):
    samples = _sample_folder(tmp_path / "samples", _images(1))
    assert main(["evaluate", "t2i", "--samples", str(samples), "--out", str(tmp_path / "x.json")]) == 2
    assert "nothing to measure" in capsys.readouterr().err


TINY_OPENCLIP = "aligntok-test-tiny-openclip"


@pytest.fixture
def hpsv2_checkpoints(tmp_path) -> tuple[Path, Path]:
    """Two tiny OpenCLIP checkpoints: HPSv2's own format ({"state_dict": ...}) and a bare state dict."""
    import open_clip

    config = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    wider = {**config, "vision_cfg": {**config["vision_cfg"], "width": 24}, "text_cfg": {**config["text_cfg"], "width": 24}}
    for name, cfg in ((TINY_OPENCLIP, config), (f"{TINY_OPENCLIP}-wider", wider)):
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp_path / f"{name}.json")  # adds a name; changes no existing entry
    paths = []
    for seed, wrap in ((0, True), (1, False)):
        torch.manual_seed(seed)
        state = open_clip.create_model(TINY_OPENCLIP).state_dict()
        paths.append(tmp_path / f"hps{seed}.pt")
        torch.save({"state_dict": state} if wrap else state, paths[-1])
    return paths[0], paths[1]


def _direct_hps(checkpoint: Path, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """HPSv2's score: the diagonal of image_features @ text_features.T from the CLIP's forward (unit features)."""
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(TINY_OPENCLIP, output_dict=True)
    state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    pixels = torch.stack([transform(Image.fromarray(image)) for image in images])
    with torch.no_grad():
        out = model.eval()(pixels, open_clip.get_tokenizer(TINY_OPENCLIP)(prompts))
    return torch.diagonal(out["image_features"] @ out["text_features"].T).double().numpy()


def test_hpsv2_is_the_cosine_of_the_checkpoints_clip_features(hpsv2_checkpoints, tmp_path):
    images = _images(4)
    samples = _sample_folder(tmp_path / "samples", images)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    scores = []
    for checkpoint in hpsv2_checkpoints:
        out = tmp_path / f"{checkpoint.stem}.json"
        assert main(["evaluate", "t2i", "--samples", str(samples), "--prompts", str(tmp_path / "prompts.txt"),
                     "--hpsv2", str(checkpoint), "--hpsv2-arch", TINY_OPENCLIP, "--batch-size", "3", "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["hpsv2"] == pytest.approx(_direct_hps(checkpoint, images, PROMPTS).mean(), abs=1e-5)
        assert result["provenance"]["feature_networks"][0]["name"] == f"HPSv2 (OpenCLIP {TINY_OPENCLIP})"
        scores.append(result["hpsv2"])
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)  # the weights are read, not a fresh random model


def test_hpsv2_errors_are_one_line(hpsv2_checkpoints, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(**kwargs):  # what hf_hub_download raises offline for a file missing from the cache
        raise LocalEntryNotFoundError(f"{kwargs['filename']} is not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    samples = _sample_folder(tmp_path / "samples", _images(1))
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    base = ["evaluate", "t2i", "--samples", str(samples), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "x.json")]
    # a checkpoint of another architecture; a hub file that is not in the cache (offline); a hub id without a file
    for args, message in (([hpsv2_checkpoints[0]], "cannot load HPSv2 checkpoint"),
                          (["nobody-here/none:HPS_v2.1_compressed.pt"], "neither a local file nor downloadable"),
                          (["xswu/HPSv2"], "ORG/NAME:PATH")):
        assert main([*base, "--hpsv2", str(args[0]), "--hpsv2-arch", f"{TINY_OPENCLIP}-wider"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
