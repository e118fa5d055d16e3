"""Where does demo-t2i lose an object's kind? A small MLP probe on the latent cells around single objects.

    OMP_NUM_THREADS=2 python docs/reproduction-t2i/kind_probe.py TOKENIZER_DIR [...] [--images 3000] > kind_probe.json

For each AlignTok tokenizer: single-object scenes of ``builtin:scenes`` (64 px; seed 5), and for each one the 3x3
window of latent cells around its object (the cell under its centre and its neighbours, zero-padded at the
border), read from the tokenizer's latent, from its encoder's features before the adapter, and, as the
reference, from the raw pixels of the same window (8x8 px per cell) and their cell means. A two-layer MLP (width
256) learns the object's kind (4, chance 25%) and colour (10) from 2500 windows and is scored on the rest. The
probe is weak on purpose (few samples, no convolution): the numbers rank the stages, they are not the
information's upper bound.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

CELL = 8  # pixels per latent cell (the demo tokenizer's stride)


def probe(features: torch.Tensor, labels: torch.Tensor, train: int, steps: int = 1500, seed: int = 0) -> float:
    """Held-out accuracy of an MLP trained on ``features[:train]`` (N, D) to predict ``labels`` (N,) int64."""
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    x = (features - mean) / std
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(256, int(labels.max()) + 1))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(train, (128,), generator=generator)
        loss = F.cross_entropy(net(x[pick]), labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        return float((net(x[train:]).argmax(1) == labels[train:]).float().mean())


def windows(grid: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The 3x3 windows of ``grid`` (N, D, H, W) centred on ``cells`` (N, 2) of (column, row), flattened (N, 9 D)."""
    padded = F.pad(grid, (1, 1, 1, 1))
    return torch.stack([padded[i, :, r : r + 3, c : c + 3].flatten() for i, (c, r) in enumerate(cells.tolist())])


def main() -> None:
    from aligntok.data.scenes import SCENE_COLOURS, SCENE_KINDS, make_scene_graph, render_scene_graphs
    from aligntok.eval.images import from_uint8, nhwc_to_tensor
    from aligntok.models.tokenizer import LatentTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tokenizers", nargs="+")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--train", type=int, default=2500)
    args = parser.parse_args()
    scenes = (make_scene_graph(5, i) for i in range(20 * args.images))
    graphs = [g for g in scenes if len(g.objects) == 1][: args.images]
    images = from_uint8(nhwc_to_tensor(render_scene_graphs(graphs, 64)))
    side = 64 // CELL
    cells = torch.tensor([[min(side - 1, int(g.objects[0].center[k] * side)) for k in (0, 1)] for g in graphs])
    kinds = torch.tensor([SCENE_KINDS.index(g.objects[0].kind) for g in graphs])
    colours = torch.tensor([list(SCENE_COLOURS).index(g.objects[0].colour) for g in graphs])
    # raw pixels as a (N, 3 * 8 * 8, 8, 8) grid of cells, and their means
    n = len(images)
    raw = images.reshape(n, 3, side, CELL, side, CELL).permute(0, 1, 3, 5, 2, 4).reshape(n, 3 * CELL * CELL, side, side)
    sources = {"raw pixels": raw, "cell means": F.avg_pool2d(images, CELL)}

    def scores(grid: torch.Tensor) -> dict[str, float]:
        x = windows(grid, cells)
        return {"kind": probe(x, kinds, args.train), "colour": probe(x, colours, args.train)}

    results = {"images": n, "train": args.train, "pixels": {name: scores(grid) for name, grid in sources.items()}}
    for directory in args.tokenizers:
        tokenizer = LatentTokenizer.from_pretrained(directory).eval()
        with torch.inference_mode():
            parts = [tokenizer.features(images[i : i + 100]) for i in range(0, n, 100)]
        results[directory] = {"encoder features": scores(torch.cat([p[0] for p in parts])),
                              "latent": scores(torch.cat([p[1] for p in parts]))}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
