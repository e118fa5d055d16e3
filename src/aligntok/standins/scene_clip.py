"""A small CLIP-like model for ``builtin:scenes``: the miniature's CLIP score, offline.

A transformers ``CLIPModel`` (ViT image tower on 64 px scenes, 8 px patches; text tower over a word-level
tokenizer of the scene captions and the miniature GenEval prompts) trained from scratch with CLIP's
contrastive loss on renders and their captions. It is saved as an ordinary CLIP directory (model,
tokenizer, image processor), so ``aligntok evaluate t2i --clip DIR`` and
:class:`aligntok.eval.t2i.CLIPScorer` use it like any CLIP. Its retrieval accuracy on held-out real
pairs is reported beside its scores as their ceiling. Scores from it compare only with scores from it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from aligntok.data.scenes import make_scene_graph, render_scene_graphs
from aligntok.eval.geneval_scenes import create_prompts, scene_for_prompt


@dataclasses.dataclass
class SceneCLIPConfig:
    """Towers, data and training of the scene CLIP."""

    width: int = 64  #: hidden size of both towers
    layers: int = 2
    heads: int = 4
    projection_dim: int = 32
    resolution: int = 64
    patch_size: int = 8
    max_length: int = 32  #: caption tokens
    train_images: int = 2000  #: builtin:scenes renders with their captions (plus GenEval-style prompt scenes)
    prompt_scenes: int = 500  #: scenes made for miniature GenEval prompts, captioned with the prompt
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def _pairs(config: SceneCLIPConfig, offset: int, count: int, prompt_count: int) -> tuple[np.ndarray, list[str]]:
    graphs = [make_scene_graph(config.seed, offset + i) for i in range(count)]
    captions = [g.caption for g in graphs]
    prompts = create_prompts(seed=config.seed + offset + 1, n=max(1, prompt_count // 5))
    for i in range(prompt_count):
        entry = prompts[i % len(prompts)]
        graphs.append(scene_for_prompt(entry, config.seed + 1, offset + i))
        captions.append(entry["prompt"])
    return render_scene_graphs(graphs, config.resolution), captions


def _words(config: SceneCLIPConfig) -> set[str]:
    from aligntok.data.scenes import _BACKDROPS, SCENE_COLOURS, SCENE_KINDS
    from aligntok.models.word_tokenizer import caption_words

    vocabulary = [*SCENE_KINDS, *SCENE_COLOURS, *_BACKDROPS, "circles", "squares", "triangles", "crosses",
                  "a an and two three four left right of above below at the top bottom on plain gradient background to"]
    return caption_words(vocabulary)


def train_scene_clip(out_dir: str | os.PathLike, config: SceneCLIPConfig | None = None) -> Path:
    """Train the scene CLIP and save it (CLIPModel, tokenizer, image processor) into ``out_dir``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from aligntok.models.word_tokenizer import word_level_tokenizer

    config = config or SceneCLIPConfig()
    torch.manual_seed(config.seed)
    tokenizer = word_level_tokenizer(_words(config), model_max_length=config.max_length)
    common = {"hidden_size": config.width, "intermediate_size": 4 * config.width, "num_hidden_layers": config.layers,
              "num_attention_heads": config.heads}
    model = CLIPModel(CLIPConfig(
        text_config={**common, "vocab_size": len(tokenizer), "max_position_embeddings": config.max_length,
                     "eos_token_id": 1, "pad_token_id": 0, "bos_token_id": 0},
        vision_config={**common, "image_size": config.resolution, "patch_size": config.patch_size},
        projection_dim=config.projection_dim,
    ))
    processor = CLIPImageProcessor(size={"shortest_edge": config.resolution},
                                   crop_size={"height": config.resolution, "width": config.resolution})
    images, captions = _pairs(config, 0, config.train_images, config.prompt_scenes)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    text = tokenizer(captions, padding="max_length", truncation=True, max_length=config.max_length, return_tensors="pt")
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, config.lr, total_steps=config.steps, pct_start=0.1)
    rng = np.random.default_rng(config.seed)
    model.train()
    for _ in range(config.steps):
        idx = torch.from_numpy(rng.choice(len(captions), size=config.batch_size, replace=False))
        loss = model(input_ids=text["input_ids"][idx], attention_mask=text["attention_mask"][idx],
                     pixel_values=pixels[idx], return_loss=True).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        schedule.step()
    out = Path(out_dir)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def retrieval_accuracy(clip_dir: str | os.PathLike, num: int = 64, seed: int = 1) -> float:
    """Top-1 image-to-caption retrieval among ``num`` held-out real (render, caption) pairs (chance 1/num)."""
    from aligntok.eval.t2i import CLIPScorer

    config = SceneCLIPConfig(seed=seed)
    images, captions = _pairs(config, 10**6, num, 0)  # indices far from any training scene
    image_embeds, text_embeds = CLIPScorer(clip_dir).embed(images, captions)
    return float(((image_embeds @ text_embeds.T).argmax(1) == torch.arange(num)).float().mean())
