"""Text-to-image metrics: CLIP score, PickScore, HPSv2, and FID against reference images, with provenance.

``evaluate_t2i(samples, prompts, clip=..., ref=...)`` is what ``aligntok evaluate t2i`` runs. Samples are
read as ``sample-t2i`` writes them (``00000.png ...`` in prompt order, ``grid.png`` ignored, prompts
from ``--prompts`` or the folder's ``sampling.json``) or in GenEval's folder layout (each prompt's
``metadata.jsonl`` and ``samples/*.png``).

* **CLIP score** (Hessel et al., 2021; torchmetrics' ``CLIPScore``): the mean over (image, prompt) pairs of
  ``100 * max(cos(E_image, E_text), 0)`` in a transformers ``CLIPModel``'s projected embedding space.
  The model is named by the caller (torchmetrics' default is ``openai/clip-vit-large-patch14``; papers
  also use B/32 or B/16) and recorded with the sha256 of its weights: scores from different CLIPs do not
  compare.
* **PickScore** (Kirstain et al., 2023; ``yuvalkirstain/PickScore_v1``, a CLIP-H fine-tune): the same
  embeddings scored as ``logit_scale * cos`` (no clipping), given its model directory or hub id.
* **FID** against a reference folder or ``.npz`` through :func:`aligntok.eval.generation.evaluate_generation`
  (torch-fidelity's Inception, 299 px TF1-bilinear resize inside the network). The protocol is recorded:
  the caption file and its sha256, how many captions and images, the image sizes, and the rule that the
  reference must hold the captions' real images already center-cropped to the generation size.

* **HPSv2** (Wu et al., 2023; weights ``xswu/HPSv2:HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt``): an
  OpenCLIP ViT-H/14 fine-tuned on human preferences, loaded through ``open_clip`` (``pip install
  'aligntok[t2i-scorers]'``); a pair scores the cosine of its unit image and text embeddings, as the
  ``hpsv2`` package's ``score`` (its own package pins pytest 7.2 and protobuf<4, so it is not a dependency).

ImageReward is not wrapped: its package pins timm 0.6.13 and fairscale (open_clip needs timm >= 1.0.17), and
its checkpoint (BLIP in the original BLIP code's layout, plus a score head) has no loader in transformers. Run it
in its own environment on the same sample folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.eval.images import IMAGE_SUFFIXES, ImageSource

SETTINGS_FILE = "sampling.json"  # what sample-t2i writes beside its PNGs
GRID_FILE = "grid.png"


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score ``100 * max(cos(image_i, text_i), 0)``, (N,), for embeddings (N, D) of any norm."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"expected two (N, D) embeddings of one shape, got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return 100.0 * cos.clamp(min=0.0)


class CLIPScorer:
    """A transformers ``CLIPModel`` with its tokenizer and image processor (from one directory or hub id).

    :meth:`embed` gives unit-norm image and text embeddings of (image, prompt) pairs; ``logit_scale`` is
    the model's learned temperature (PickScore's multiplier).
    """

    def __init__(self, source: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from aligntok.hub import resolve_directory

        self.source = str(source)
        directory = resolve_directory(self.source, what="CLIP model", error=FileNotFoundError)
        try:
            self.model = CLIPModel.from_pretrained(directory).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(directory)
            self.processor = AutoImageProcessor.from_pretrained(directory)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a CLIPModel with its tokenizer and image processor from "
                             f"'{source}': {str(e).splitlines()[0]}") from None
        self.directory, self.device = Path(directory), torch.device(device)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @torch.inference_mode()
    def embed(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm (image, text) embeddings, each (N, D), of uint8 (N, H, W, 3) images and N prompts."""
        max_length = self.model.config.text_config.max_position_embeddings
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self.model(input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device),
                         pixel_values=pixels.to(self.device))
        unit = lambda x: torch.nn.functional.normalize(x.float(), dim=-1)
        return unit(out.image_embeds).cpu(), unit(out.text_embeds).cpu()

    def describe(self) -> dict[str, Any]:
        from aligntok.eval.provenance import sha256_files

        weights = sorted(self.directory.glob("*.safetensors")) or sorted(self.directory.glob("*.bin"))
        return {"name": "CLIPModel", "source": self.source,
                "weights_sha256": sha256_files(weights) if weights else None,
                "image_size": int(self.model.config.vision_config.image_size)}


HPSV2_ARCH = "ViT-H-14"  #: the OpenCLIP architecture HPSv2 and v2.1 fine-tune


class HPSv2Scorer:
    """HPSv2: an OpenCLIP model (``arch``) with the weights of an HPSv2 checkpoint file, its tokenizer and its
    evaluation transform (resize, center crop, CLIP normalisation). :meth:`embed` as :class:`CLIPScorer`'s.

    ``source``: a checkpoint file (HPSv2's ``{"state_dict": ...}`` or a bare state dict) or ``ORG/NAME:FILE`` on
    the hub. Raises ValueError (one line) without open_clip or when the checkpoint does not fit ``arch``.
    """

    def __init__(self, source: str | os.PathLike, device: torch.device | str = "cpu", arch: str = HPSV2_ARCH) -> None:
        from aligntok.hub import resolve_file

        try:
            import open_clip
        except ImportError:
            raise ValueError("HPSv2 needs open_clip: pip install 'aligntok[t2i-scorers]'") from None
        self.source, self.arch, self.device = str(source), arch, torch.device(device)
        self.path = resolve_file(self.source, what="HPSv2 checkpoint", error=FileNotFoundError)
        try:
            self.model, _, self.transform = open_clip.create_model_and_transforms(arch, pretrained=str(self.path),
                                                                                  device=self.device)
        except (RuntimeError, AssertionError, KeyError) as e:  # open_clip's shape checks are asserts
            raise ValueError(f"cannot load HPSv2 checkpoint {self.path} into OpenCLIP {arch}: "
                             f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)

    @torch.inference_mode()
    def embed(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm (image, text) embeddings, each (N, D), of uint8 (N, H, W, 3) images and N prompts."""
        from PIL import Image

        pixels = torch.stack([self.transform(Image.fromarray(image)) for image in images]).to(self.device)
        image_embeds = self.model.encode_image(pixels, normalize=True)
        text_embeds = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)
        return image_embeds.float().cpu(), text_embeds.float().cpu()

    def describe(self) -> dict[str, Any]:
        from aligntok.eval.provenance import sha256_file

        return {"name": f"HPSv2 (OpenCLIP {self.arch})", "source": self.source, "weights_sha256": sha256_file(self.path)}


def read_t2i_samples(samples: str | os.PathLike, prompts: str | os.PathLike | None = None) -> tuple[list[Path], list[str]]:
    """(image files, their prompts) of a sample folder; see the module doc for the layouts read.

    Raises a one-line ValueError when the prompts cannot be found or their count differs from the images'.
    """
    from aligntok.diffusion.t2i_sampling import read_prompts
    from aligntok.eval.geneval import METADATA_FILE, SAMPLES_DIR

    folder = Path(samples)
    if not folder.is_dir():
        raise ValueError(f"sample folder {folder} does not exist")
    geneval = sorted(d for d in folder.iterdir() if d.is_dir() and d.name.isdigit() and (d / METADATA_FILE).is_file())
    if geneval:
        files, texts = [], []
        for d in geneval:
            prompt = json.loads((d / METADATA_FILE).read_text(encoding="utf-8"))["prompt"]
            own = sorted(p for p in (d / SAMPLES_DIR).glob("*.png") if p.stem.isdigit())
            files += own
            texts += [prompt] * len(own)
        if not files:
            raise ValueError(f"{folder}: GenEval layout without samples/*.png")
        return files, texts
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name != GRID_FILE)
    if prompts is not None:
        texts = read_prompts(prompts)
    elif (folder / SETTINGS_FILE).is_file():
        texts = json.loads((folder / SETTINGS_FILE).read_text())["prompts"]
    else:
        raise ValueError(f"{folder} has no {SETTINGS_FILE}: pass --prompts FILE (one prompt per image, in file-name order)")
    if len(texts) != len(files):
        raise ValueError(f"{folder} holds {len(files)} images but {len(texts)} prompts were given")
    if not files:
        raise ValueError(f"{folder}: no images")
    return files, texts


def _load_batch(files: Sequence[Path]) -> np.ndarray:
    from aligntok.eval.images import _decode_rgb

    images = [_decode_rgb(path) for path in files]
    if len({image.shape for image in images}) != 1:
        raise ValueError("sample images differ in size; CLIP scoring batches need one size")
    return np.stack(images)


def score_pairs(scorer: CLIPScorer | HPSv2Scorer, files: Sequence[Path], prompts: Sequence[str], batch_size: int) -> np.ndarray:
    """Per-pair cosine similarity of the scorer's unit-norm embeddings, (N,) float64."""
    out = []
    for start in range(0, len(files), batch_size):
        images, texts = scorer.embed(_load_batch(files[start : start + batch_size]), prompts[start : start + batch_size])
        out.append((images * texts).sum(-1).double().numpy())
    return np.concatenate(out)


def evaluate_t2i(
    samples: str | os.PathLike,
    prompts: str | os.PathLike | None = None,
    *,
    clip: str | os.PathLike | None = None,
    pickscore: str | os.PathLike | None = None,
    hpsv2: str | os.PathLike | None = None,
    hpsv2_arch: str = HPSV2_ARCH,
    ref: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    allow_download: bool = True,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    inception=None,
) -> dict[str, Any]:
    """CLIP score, PickScore, HPSv2 and FID of a text-to-image sample folder (each only when its model/reference is given).

    Returns a JSON-ready dict: ``clip_score`` (mean of the per-pair scores) and ``clip_score_std``,
    ``pickscore`` (mean), ``hpsv2`` (mean), ``fid`` and the other ``evaluate gen`` numbers under ``generation``,
    ``num_images``, ``num_prompts`` and ``provenance``. Raises ValueError when nothing is asked for.
    """
    from aligntok.eval.provenance import build_provenance, sha256_file

    if clip is None and pickscore is None and hpsv2 is None and ref is None:
        raise ValueError("nothing to measure: give a CLIP model (--clip), a PickScore model (--pickscore), "
                         "an HPSv2 checkpoint (--hpsv2) or --ref")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files, texts = read_t2i_samples(samples, prompts)
    result: dict[str, Any] = {"num_images": len(files), "num_prompts": len(set(texts))}
    networks: list[dict[str, Any]] = []
    if clip is not None:
        scorer = CLIPScorer(clip, device)
        scores = 100.0 * np.maximum(score_pairs(scorer, files, texts, batch_size), 0.0)
        result["clip_score"], result["clip_score_std"] = float(scores.mean()), float(scores.std())
        networks.append({**scorer.describe(), "role": "clip_score: 100 * max(cos, 0), mean over pairs"})
    if pickscore is not None:
        scorer = CLIPScorer(pickscore, device)
        result["pickscore"] = float((scorer.logit_scale * score_pairs(scorer, files, texts, batch_size)).mean())
        networks.append({**scorer.describe(), "role": "pickscore: logit_scale * cos, mean over pairs"})
    if hpsv2 is not None:
        scorer = HPSv2Scorer(hpsv2, device, arch=hpsv2_arch)
        result["hpsv2"] = float(score_pairs(scorer, files, texts, batch_size).mean())
        networks.append({**scorer.describe(), "role": "hpsv2: cos of unit OpenCLIP embeddings, mean over pairs"})
    fid_protocol = None
    if ref is not None:
        from aligntok.eval.generation import evaluate_generation
        from aligntok.eval.images import _decode_rgb

        height, width = _decode_rgb(files[0]).shape[:2]
        source = ImageSource(path=Path(samples), kind="folder", num_images=len(files), height=height, width=width,
                             files=tuple(files))
        generation = evaluate_generation(source, ref, inception=inception, inception_weights=inception_weights,
                                         dinov2=None, batch_size=batch_size, allow_download=allow_download, device=device)
        result["fid"] = generation["fid"]
        result["generation"] = {k: v for k, v in generation.items() if k != "provenance"}
        networks += generation["provenance"]["feature_networks"]
        fid_protocol = {
            "rule": "one image per caption against those captions' real images, center-cropped by the caller to the "
                    "generation size; both resized to 299 px inside Inception (torch-fidelity, TF1 bilinear)",
            "num_captions": len(texts), "num_samples": len(files), "sample_size": [height, width],
            "reference": generation["provenance"]["reference"],
        }
    caption_file = None
    if prompts is not None:
        caption_file = {"path": str(prompts), "sha256": sha256_file(prompts)}
    result["provenance"] = build_provenance(
        num_samples=len(files), reference=fid_protocol["reference"] if fid_protocol else None,
        feature_networks=networks, device=device,
        settings={"samples": str(samples), "captions": caption_file or f"{samples}/{SETTINGS_FILE} or GenEval metadata",
                  "fid_protocol": fid_protocol, "batch_size": batch_size,
                  "not_computed": "ImageReward (use its own package on the same folder)"},
    )
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    def number(key: str, digits: int) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    return [f"t2i: {result['num_images']} images, {result['num_prompts']} distinct prompts",
            f"  CLIP score {number('clip_score', 3)}  PickScore {number('pickscore', 3)}  "
            + f"HPSv2 {number('hpsv2', 4)}  FID {number('fid', 4)}"]
