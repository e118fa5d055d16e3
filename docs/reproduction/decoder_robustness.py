"""How much each tokenizer's decoder is hurt by errors in its latent (a DiT's samples are never exact latents).

    python docs/reproduction/decoder_robustness.py RUN_DIR [--sigmas 0 0.1 0.2 0.3 0.5] [--out FILE.json]

RUN_DIR: a finished `aligntok reproduce` folder, or one variant of dit_variants.py (OUT_DIR/NAME). For every
method and seed in it: encode the held-out images, add Gaussian noise of ``sigma`` times each channel's standard
deviation (sigma is in the units the DiT works in: latents normalised per channel), decode, and measure the
Fréchet distance to the originals and the class accuracy in the evaluation network's features (sigma = 0 gives
rFD and the reconstructions' class accuracy), and PSNR. Prints mean +- std over seeds. A VAE's decoder is trained
on samples of its posterior; AlignTok's decodes exact latents.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from aligntok.config import load_config
from aligntok.eval.images import to_uint8
from aligntok.eval.recon import psnr
from aligntok.experiments.pipeline import Experiment, ExperimentConfig, heldout_set
from aligntok.experiments.reproduce import mean_std
from aligntok.standins import evaluate_builtin


@torch.inference_mode()
def robustness(e: Experiment, images: torch.Tensor, labels: torch.Tensor, sigmas: list[float], network) -> dict:
    tokenizer = e.load_tokenizer()
    latents = e.encode(tokenizer, images)
    std = latents.std(dim=(0, 2, 3), keepdim=True)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    out = {}
    for sigma in sigmas:
        decoded = torch.cat([to_uint8(tokenizer.decode(part)) for part in (latents + sigma * std * noise).split(100)])
        result = evaluate_builtin(decoded, labels, images, network=network)
        out[str(sigma)] = {"fd": result["fd"], "class_accuracy": result["class_accuracy"],
                           "psnr": float(psnr(images, decoded).mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--methods", nargs="+", default=["aligntok", "vae", "vavae"])
    parser.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    shared = None
    for method in args.methods:
        results[method] = {}
        runs = args.run_dir / "runs" if (args.run_dir / "runs").is_dir() else args.run_dir  # or a dit_variants NAME
        for folder in sorted((runs / method).glob("seed*")):
            cfg = load_config(ExperimentConfig, folder / "experiment.yaml")
            e = Experiment(cfg, folder)
            if shared is None:
                shared = (*heldout_set(cfg.eval, e.resolution, cfg.difficulty), e.eval_network)
            results[method][folder.name] = robustness(e, shared[0], shared[1], args.sigmas, shared[2])
        for sigma in map(str, args.sigmas):
            fd, accuracy, db = (mean_std([r[sigma][key] for r in results[method].values()])
                                for key in ("fd", "class_accuracy", "psnr"))
            print(f"{method:9s} sigma {sigma:4s}  FD {fd['mean']:6.1f} ± {fd['std']:4.1f}  "
                  f"class acc. {100 * accuracy['mean']:5.1f}%  PSNR {db['mean']:5.2f} dB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
