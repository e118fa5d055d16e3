"""Using a trained tokenizer: reconstructions written as PNG."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from aligntok.data import ShardDataset, build_dataset
from aligntok.eval.images import to_uint8_nhwc, write_png
from aligntok.eval.selection import readable_mask, select_images, selection_loader
from aligntok.models.tokenizer import AlignTokTokenizer

_PAIR = re.compile(r"^(\d{5})_(input|recon)\.png$")


@torch.no_grad()
def reconstruct_to_pngs(
    tokenizer: str | Path, images: str, out_dir: str | Path, *, num: int | None = 16, resolution: int = 256,
    batch_size: int = 8,
) -> tuple[int, list[str]]:
    """Encode and decode up to ``num`` images of a data spec (None or more than it holds: all; fewer: a seeded
    subset read in dataset order, as ``evaluate recon`` picks them) and write NNNNN_input.png and
    NNNNN_recon.png for each.

    Returns (pairs written, the unreadable images skipped: named, never replaced by a neighbour). Pairs a
    previous call left in ``out_dir`` beyond this call's are removed, so the folder holds this call's only.
    Raises ValueError for ``num`` below 1.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AlignTokTokenizer.from_pretrained(tokenizer).to(device)
    dataset = build_dataset(images, resolution)
    available = dataset.reader_epoch_length(0, 1) if isinstance(dataset, ShardDataset) else len(dataset)
    if num is not None and num > available:
        num = None  # each image once, never repeated
    selection = select_images(dataset, num, rank=0, world_size=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    for batch in selection_loader(selection, batch_size, num_workers=0):
        readable, bad = readable_mask(batch)
        skipped += bad
        if not readable.any():
            continue
        x = batch["image"][readable].to(device)
        for a, b in zip(to_uint8_nhwc(x), to_uint8_nhwc(tok.decode(tok.encode(x))), strict=True):
            write_png(a, out / f"{written:05d}_input.png")
            write_png(b, out / f"{written:05d}_recon.png")
            written += 1
    for stale in out.iterdir():
        match = _PAIR.match(stale.name)
        if match and int(match.group(1)) >= written:
            stale.unlink()
    return written, skipped
