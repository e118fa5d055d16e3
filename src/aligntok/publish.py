"""``push_to_hub``: a tokenizer, LightningDiT or pipeline, its training config and metrics, as a Hub model repository.

The uploaded folder is the saved model (config.json, model.safetensors) plus:

* README.md: a model card whose front matter carries what the Hub reads (``library_name: aligntok``,
  license, tags, datasets, base_model, and the metrics as ``model-index`` when a dataset is named), and
  whose text describes the model, shows how to load it, and lists the training config and metrics;
* training_config.yaml: the run's resolved config (``RUN/config.yaml`` beside ``RUN/model`` or
  ``RUN/stageN`` is found by itself);
* eval/NAME.json: the ``aligntok evaluate`` results given (``DIR.eval-*.json`` beside the directory are
  found by itself).

``from_pretrained`` of the pushed repository's id then loads the model (offline from the Hugging Face cache).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from aligntok.hub import (
    CARD_NAME,
    DEFAULT_LICENSE,
    LIBRARY_NAME,
    card_body,
    model_card,
    upload_directory,
)
from aligntok.models.lightningdit import FORMAT_NAME as DIT_FORMAT
from aligntok.models.tokenizer import FORMAT_NAME as TOKENIZER_FORMAT
from aligntok.pipelines import PIPELINE_MODULE, AlignTokClassPipeline
from aligntok.pipelines_t2i import AlignTokT2IPipeline

PIPELINE_FORMAT = "aligntok-class-pipeline"  # what _read_document reports for an AlignTokClassPipeline directory
T2I_PIPELINE_FORMAT = "aligntok-t2i-pipeline"  # ... and for an AlignTokT2IPipeline directory
T2I_TAGS = ["aligntok", "text-to-image", "flux"]
DIT_TAGS = ["aligntok", "lightningdit", "class-conditional"]

CONFIG_FILE = "training_config.yaml"
EVAL_DIR = "eval"
#: metrics of `aligntok evaluate` results that go into the card's model-index, with the Hub task they measure
INDEXED_METRICS = {
    "fid": "unconditional-image-generation", "is": "unconditional-image-generation",
    "precision": "unconditional-image-generation", "recall": "unconditional-image-generation",
    "fd_dinov2": "unconditional-image-generation",
    "rfid": "image-to-image", "psnr": "image-to-image", "ssim": "image-to-image", "lpips": "image-to-image",
}


def push_to_hub(
    model_or_directory: Any,
    repo_id: str,
    *,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    metrics: Sequence[str | os.PathLike] | None = None,
    license: str | None = None,
    datasets: Sequence[str] = (),
    base_model: str | None = None,
    tags: Sequence[str] = (),
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with aligntok",
) -> str:
    """Upload a tokenizer, LightningDiT or pipeline (Class or T2I; loaded, or a directory saved by one) to ``repo_id``.

    ``config``: the training config (a YAML file or a mapping; default: ``config.yaml`` in the directory's
    parent, the run folder, if there). ``metrics``: ``aligntok evaluate`` JSON files (default: the
    ``DIR.eval-*.json`` beside the directory). ``license``: an SPDX-style Hub license id (default
    apache-2.0, aligntok's, except for a wrapped diffusers VAE, whose source's license applies: name it).
    ``datasets``: Hub dataset ids the model was trained on (e.g. ``ILSVRC/imagenet-1k``); the metrics
    enter the card's model-index on the first. ``base_model``: default the tokenizer's encoder or VAE hub id.
    A pipeline's card names ``library_name: diffusers``. Returns the commit URL. Raises ValueError (one
    line) for a directory that is none of these.
    """
    with tempfile.TemporaryDirectory(prefix="aligntok-push-") as tmp:
        if isinstance(model_or_directory, (str, os.PathLike)):
            directory = Path(model_or_directory)
        else:
            directory = Path(tmp) / "model"
            model_or_directory.save_pretrained(directory)
        document = _read_document(directory)
        run_config = _training_config(config, directory, saved=isinstance(model_or_directory, (str, os.PathLike)))
        metric_files = _metric_files(metrics, directory, saved=isinstance(model_or_directory, (str, os.PathLike)))
        results = {path.stem: json.loads(path.read_text()) for path in metric_files}

        library = LIBRARY_NAME
        if document.get("format") == TOKENIZER_FORMAT:
            card, defaults = _tokenizer_card(directory, document)
        elif document.get("format") == PIPELINE_FORMAT:
            card, defaults, library = _pipeline_card(document), {"tags": [*DIT_TAGS, "aligntok"], "base_model": None}, "diffusers"
        elif document.get("format") == T2I_PIPELINE_FORMAT:
            card, defaults, library = _t2i_pipeline_card(document), {"tags": T2I_TAGS, "base_model": None}, "diffusers"
        else:
            card, defaults = _dit_card(document), {"tags": DIT_TAGS, "base_model": None}
        if license is None and document.get("method") != "diffusers-vae":
            license = DEFAULT_LICENSE
        body = card + _config_section(run_config) + _metrics_section(results)
        readme = model_card(
            body, tags=[*defaults["tags"], *tags], license=license, datasets=datasets,
            base_model=base_model or defaults["base_model"], model_name=repo_id.split("/")[-1],
            eval_results=_eval_results(results, datasets[0]) if datasets else (), library_name=library,
        )

        staging = Path(tmp) / "upload"
        shutil.copytree(directory, staging, ignore=shutil.ignore_patterns(CARD_NAME, ".*"))
        (staging / CARD_NAME).write_text(readme)
        if run_config is not None:
            (staging / CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=False))
        for path in metric_files:
            (staging / EVAL_DIR).mkdir(exist_ok=True)
            shutil.copyfile(path, staging / EVAL_DIR / path.name)
        return upload_directory(staging, repo_id, private=private, token=token, commit_message=commit_message)


def _read_document(directory: Path) -> dict[str, Any]:
    """The directory's config.json; for an AlignTokClassPipeline, its transformer's (format PIPELINE_FORMAT)."""
    pipeline = _read_json(directory / "model_index.json")
    if isinstance(pipeline, dict) and pipeline.get("_class_name") == [PIPELINE_MODULE, AlignTokClassPipeline.__name__]:
        transformer = _read_json(directory / "transformer" / "config.json") or {}
        return {"format": PIPELINE_FORMAT, "config": transformer.get("dit_config", {})}
    if isinstance(pipeline, dict) and pipeline.get("_class_name") == [PIPELINE_MODULE, AlignTokT2IPipeline.__name__]:
        info = (_read_json(directory / "transformer" / "config.json") or {}).get("info", {})
        return {"format": T2I_PIPELINE_FORMAT, "config": info.get("config", {}), "text": info.get("text", {}),
                "resolution": info.get("resolution")}
    document = _read_json(directory / "config.json")
    if not isinstance(document, dict) or document.get("format") not in (TOKENIZER_FORMAT, DIT_FORMAT):
        raise ValueError(
            f"'{directory}' is not a saved aligntok tokenizer, LightningDiT or AlignTokClassPipeline / AlignTokT2IPipeline "
            "(no config.json or model_index.json of one)"
        )
    return document


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _training_config(given: Any, directory: Path, *, saved: bool) -> dict[str, Any] | None:
    if isinstance(given, Mapping):
        return dict(given)
    path = Path(given) if given is not None else directory.resolve().parent / "config.yaml"
    if given is None and not (saved and path.is_file()):
        return None
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"training config {path} is not a YAML mapping")
    return loaded


def _metric_files(given: Sequence[str | os.PathLike] | None, directory: Path, *, saved: bool) -> list[Path]:
    if given is None:
        if not saved:
            return []
        resolved = directory.resolve()
        return sorted(resolved.parent.glob(f"{resolved.name}.eval-*.json"))
    paths = [Path(p) for p in given]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"metrics file {path} does not exist")
    return paths


def _tokenizer_card(directory: Path, document: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The body save_pretrained wrote, and its front matter's tags and base_model as defaults."""
    from huggingface_hub import ModelCard

    readme = directory / CARD_NAME
    if not readme.is_file():
        raise ValueError(f"tokenizer directory '{directory}' has no {CARD_NAME}: re-save it with save_pretrained")
    data = ModelCard.load(readme).data
    tags = list(data.tags or ["aligntok", "image-tokenizer", document.get("method", "aligntok")])
    return card_body(readme.read_text()), {"tags": tags, "base_model": data.base_model}


def _dit_summary(c: dict[str, Any]) -> list[str]:
    return [
        f"- Latents: {c['in_channels']}x{c['input_size']}x{c['input_size']}; patch {c['patch_size']}.",
        (
            f"- Transformer: depth {c['depth']}, width {c['hidden_size']}, {c['num_heads']} heads; "
            f"{c['num_classes']} classes (label {c['num_classes']} = unconditional, for guidance)."
        ),
    ]


def _pipeline_card(document: dict[str, Any]) -> str:
    return "\n".join([
        "# AlignTok class-to-image pipeline",
        "",
        "A diffusers pipeline made by `aligntok export-pipeline`: a LightningDiT trained with rectified flow on an",
        "image tokenizer's latents, that tokenizer, and diffusers' `FlowMatchEulerDiscreteScheduler` on aligntok's",
        "time grid. Needs `pip install aligntok` (the pipeline's classes live there).",
        "",
        *_dit_summary(document["config"]),
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("<this hub id>", trust_remote_code=True)  # or AlignTokClassPipeline',
        "images = pipe(class_labels=[207, 360], num_inference_steps=250, guidance_scale=4.0).images",
        "```",
    ])


def _t2i_pipeline_card(document: dict[str, Any]) -> str:
    c, text = document["config"], document["text"]
    pooled = text.get("pooled", "mean")
    pooled = f"CLIP `{pooled}`" if pooled not in ("mean", "zeros") else f"the T5 states' {pooled}"
    return "\n".join([
        "# AlignTok text-to-image pipeline",
        "",
        "A diffusers pipeline made by `aligntok export-pipeline`: a FLUX-architecture transformer trained with",
        "rectified flow on an image tokenizer's latents, its text encoders, that tokenizer, and diffusers'",
        "`FlowMatchEulerDiscreteScheduler` on aligntok's time grid. Needs `pip install aligntok`.",
        "",
        (f"- Transformer: {c.get('num_layers')} double-stream + {c.get('num_single_layers')} single-stream blocks, "
         f"width {c.get('num_heads', 0) * c.get('head_dim', 0)}; {c.get('in_channels')}-channel latents, "
         f"packing {c.get('pack')}."),
        f"- Text: T5 `{text.get('encoder')}` (up to {text.get('max_length')} tokens); pooled vector from {pooled}.",
        f"- Trained at {document.get('resolution')} px.",
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("<this hub id>", trust_remote_code=True)  # or AlignTokT2IPipeline',
        'images = pipe(prompt=["a red circle left of a blue square"], num_inference_steps=30, guidance_scale=4.0).images',
        "```",
    ])


def _dit_card(document: dict[str, Any]) -> str:
    return "\n".join([
        "# LightningDiT (aligntok)",
        "",
        "A class-conditional LightningDiT (SwiGLU, RoPE, RMSNorm) trained with rectified flow on an image",
        "tokenizer's normalised latents by aligntok. Sample it with the tokenizer it was trained on.",
        "",
        *_dit_summary(document["config"]),
        "",
        "## Usage",
        "",
        "```bash",
        "aligntok sample --dit <this hub id> --tokenizer <its tokenizer> --num 50000 --cfg-scale 6.7 --out samples",
        "```",
        "",
        "```python",
        "from aligntok import LightningDiT",
        "",
        'model = LightningDiT.from_pretrained("<this hub id>")  # model(x, t, y) -> velocity; t in [0, 1], 1 = data',
        "```",
    ])


def _config_section(config: dict[str, Any] | None) -> str:
    if config is None:
        return ""
    dumped = yaml.safe_dump(config, sort_keys=False).strip()
    return f"\n\n## Training config\n\nAlso in `{CONFIG_FILE}`.\n\n```yaml\n{dumped}\n```"


def _metrics_section(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"| {source} | {key} | {value:.4g} |"
        for source, result in results.items()
        for key, value in result.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    if not rows:
        return ""
    header = f"\n\n## Metrics\n\nFrom `aligntok evaluate` (full results with provenance in `{EVAL_DIR}/`).\n\n"
    return header + "| result | metric | value |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def _eval_results(results: dict[str, dict[str, Any]], dataset: str) -> list[Any]:
    from huggingface_hub import EvalResult

    return [
        EvalResult(task_type=INDEXED_METRICS[key], dataset_type=dataset, dataset_name=dataset, metric_type=key,
                   metric_value=float(value), metric_name=f"{key} ({source})")
        for source, result in results.items()
        for key, value in result.items()
        if key in INDEXED_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
