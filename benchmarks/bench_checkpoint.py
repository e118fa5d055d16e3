"""Size and write time of a training checkpoint of the paper-sized tokenizer (stage 2, the largest).

Stage 2 trains everything and keeps an EMA, so its checkpoint holds the tokenizer (DINOv2-L/14 +
adapter + f16d32 decoder), its EMA, the discriminator, and AdamW moments for both. The weights are
random (no download): a DINOv2-L config is written locally and loaded through the same path as a hub id.

Anchor: one bare ``safetensors.torch.save_file`` of the same tokenizer weights followed by an fsync (our
checkpoint fsyncs every file, so an anchor left in the page cache would flatter the bare write), timed in
the same run; the ratio compares write throughput (MB/s) of the whole atomic checkpoint against it.

    python benchmarks/bench_checkpoint.py [--out /tmp/ckpt_bench]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from aligntok.config import OptimConfig, TrainConfig
from aligntok.losses.reconstruction import ReconLossConfig, ReconstructionLoss
from aligntok.losses.semantic import SemanticLossConfig, SemanticPreservationLoss
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig
from aligntok.training.stages import STAGES, TokenizerStageTask
from aligntok.training.trainer import Trainer


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    scratch = args.out or Path(tempfile.mkdtemp(prefix="aligntok_ckpt_bench_"))
    scratch.mkdir(parents=True, exist_ok=True)

    # DINOv2-L/14 architecture with random weights, saved the way transformers saves a hub model.
    encoder_dir = scratch / "dinov2-large-random"
    hf = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=518)
    Dinov2Model(hf).save_pretrained(encoder_dir)
    tok = AlignTokTokenizer.from_config(TokenizerConfig(encoder=str(encoder_dir)))
    counts = {part: sum(p.numel() for p in getattr(tok, part).parameters()) for part in ("encoder", "adapter", "decoder")}

    recon = ReconstructionLoss(ReconLossConfig(lpips_pretrained_backbone=False, gan_start=0))
    semantic = SemanticPreservationLoss(SemanticLossConfig(), encoder=tok.encoder, adapter=tok.adapter)
    task = TokenizerStageTask(tok, STAGES[2], recon, semantic)
    batch = {"image": torch.rand(1, 3, 32, 32) * 2 - 1}  # tiny input: the checkpoint size does not depend on it
    trainer = Trainer(
        task,
        train=TrainConfig(steps=1, batch_size=1, ema_decay=0.9999, ckpt_every=1000, keep_last=2),
        optim={"generator": OptimConfig(), "discriminator": OptimConfig()},
        loader_factory=lambda start: itertools.repeat(batch),
        out_dir=scratch / "run",
    )
    trainer.fit()  # one step so that AdamW has its moments; writes step 1

    started = time.perf_counter()
    trainer.step += 1
    path = trainer.save_checkpoint()
    ours_s = time.perf_counter() - started
    ours_bytes = dir_bytes(path)

    weights = {k: v.detach().contiguous() for k, v in tok.state_dict().items()}
    started = time.perf_counter()
    save_file(weights, str(scratch / "bare.safetensors"))
    with open(scratch / "bare.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    bare_s = time.perf_counter() - started
    bare_bytes = (scratch / "bare.safetensors").stat().st_size

    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    print(f"checkpoint: {ours_bytes / 1e9:.2f} GB in {ours_s:.1f} s ({ours_bytes / 1e6 / ours_s:.0f} MB/s), files:")
    for f in sorted(path.iterdir()):
        print(f"  {f.name:40s} {f.stat().st_size / 1e6:10.1f} MB")
    print(f"anchor (bare safetensors of the tokenizer + fsync): {bare_bytes / 1e9:.2f} GB in {bare_s:.1f} s "
          f"({bare_bytes / 1e6 / bare_s:.0f} MB/s)")
    print(f"throughput ratio ours/anchor: {(ours_bytes / ours_s) / (bare_bytes / bare_s):.2f}")
    if args.out is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
