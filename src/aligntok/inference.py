"""Using a trained tokenizer: reconstructions written as PNG."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from aligntok.data import build_dataset, build_loader
from aligntok.eval.images import to_uint8_nhwc, write_png
from aligntok.models.tokenizer import AlignTokTokenizer


@torch.no_grad()
def reconstruct_to_pngs(
    tokenizer: str | Path, images: str, out_dir: str | Path, *, num: int = 16, resolution: int = 256,
    batch_size: int = 8,
) -> int:
    """Encode and decode the first ``num`` images of a data spec; write NNNNN_input.png and NNNNN_recon.png."""
    if num <= 0:
        raise ValueError(f"--num must be positive, got {num}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AlignTokTokenizer.from_pretrained(tokenizer).to(device)
    dataset = build_dataset(images, resolution)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    batch_size = min(batch_size, num)
    for batch in islice(build_loader(dataset, batch_size, shuffle=False), -(-num // batch_size)):
        x = batch["image"][: num - written].to(device)
        for a, b in zip(to_uint8_nhwc(x), to_uint8_nhwc(tok.decode(tok.encode(x)))):
            write_png(a, out / f"{written:05d}_input.png")
            write_png(b, out / f"{written:05d}_recon.png")
            written += 1
    return written
