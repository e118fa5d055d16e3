"""How each tokenizer's latent is shaped, as the DiT sees it (cached latents, normalised per channel).

    python docs/reproduction/latent_structure.py RUN_DIR [--methods aligntok vae vavae] [--out FILE.json]

For every method and seed of a finished `aligntok reproduce` folder (its runs/METHOD/seedN/latents cache):

* ``dims_90`` / ``dims_99``: principal components of the whole latent (C*H*W numbers per image) holding 90% / 99%
  of its variance; ``participation_ratio``: (sum s)^2 / sum s^2 of those variances (an effective dimension);
* ``adjacent_correlation``: correlation of horizontally and vertically neighbouring latent values (smoothness);
* ``low_frequency_share``: share of the spatial power spectrum in the 3x3 lowest frequencies;
* ``class_variance_share``: share of the latent's variance explained by the class means (how much of what the
  DiT must model is the class);
* ``kurtosis`` of the normalised values (3 for a Gaussian).

Prints mean +- std over seeds; numpy only, seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def structure(latents: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The measures above for latents (N, C, H, W) and integer labels (N,)."""
    x = latents.astype(np.float64)
    z = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)
    n, _, h, w = z.shape
    flat = z.reshape(n, -1)
    flat = flat - flat.mean(0)
    variances = np.linalg.svd(flat, compute_uv=False) ** 2
    cumulative = np.cumsum(variances) / variances.sum()
    pairs = [(z[:, :, :, :-1], z[:, :, :, 1:]), (z[:, :, :-1, :], z[:, :, 1:, :])]
    left = np.concatenate([a.ravel() for a, _ in pairs])
    right = np.concatenate([b.ravel() for _, b in pairs])
    power = np.fft.fftshift((np.abs(np.fft.fft2(z, axes=(2, 3))) ** 2).mean(axis=(0, 1)))
    class_means = np.stack([flat[labels == k].mean(0) for k in np.unique(labels)])
    return {
        "dims_90": int(np.searchsorted(cumulative, 0.90) + 1),
        "dims_99": int(np.searchsorted(cumulative, 0.99) + 1),
        "participation_ratio": float(variances.sum() ** 2 / (variances ** 2).sum()),
        "adjacent_correlation": float(np.corrcoef(left, right)[0, 1]),
        "low_frequency_share": float(power[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2].sum() / power.sum()),
        "class_variance_share": float(class_means.var(0).sum() / flat.var(0).sum()),
        "kurtosis": float((z ** 4).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--methods", nargs="+", default=["aligntok", "vae", "vavae"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    for method in args.methods:
        per_seed = {}
        for cache in sorted((args.run_dir / "runs" / method).glob("seed*/latents/shard-00000.safetensors")):
            tensors = load_file(str(cache))
            per_seed[cache.parent.parent.name] = structure(tensors["latents"], tensors["labels"])
        keys = next(iter(per_seed.values()))
        results[method] = {
            key: {"mean": float(np.mean([r[key] for r in per_seed.values()])),
                  "std": float(np.std([r[key] for r in per_seed.values()], ddof=1)) if len(per_seed) > 1 else 0.0}
            for key in keys
        } | {"per_seed": per_seed}
        print(method, "  ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}" for k, v in results[method].items()
                                if k != "per_seed"))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
