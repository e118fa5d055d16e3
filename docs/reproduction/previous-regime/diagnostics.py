"""Diagnostics on a finished `aligntok reproduce` folder: where does the class information go?

    python docs/reproduction/previous-regime/diagnostics.py RUN_DIR [--dit-steps 4000] [--out diagnostics.json]

1. Class information kept by each tokenizer (seed 0 of every method): the evaluation network's class
   accuracy on the held-out originals and on their reconstructions (the most a generator on those latents
   could show), and linear probes on average-pooled latents (the paper's protocol) and on flattened ones.
   The stand-in encoder's own tokens are probed the same way.
2. Whether a longer DiT learns to use the class: a DiT trained ``--dit-steps`` on seed 0's latents of
   AlignTok and of the VAE, with gFD and class accuracy of guided and unguided samples at its checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from aligntok.config import load_config
from aligntok.eval.probe import average_pool, linear_probe
from aligntok.experiments.pipeline import Experiment, probe_training_set
from aligntok.experiments.reproduce import ReproduceConfig, for_method, seeded
from aligntok.models.encoders import load_encoder
from aligntok.standins import builtin_class_accuracy


def _probes(train: torch.Tensor, train_labels, test: torch.Tensor, test_labels) -> dict[str, float]:
    return {
        "pooled": linear_probe(average_pool(train), train_labels, average_pool(test), test_labels)["accuracy"],
        "flattened": linear_probe(train.flatten(1), train_labels, test.flatten(1), test_labels)["accuracy"],
    }


def class_information(rcfg: ReproduceConfig, run: Path) -> dict[str, dict]:
    result = {}
    for method in rcfg.methods:
        cfg = for_method(seeded(rcfg.experiment, rcfg.seeds[0]), method)
        e = Experiment(cfg, run / "runs" / method / f"seed{rcfg.seeds[0]}")
        images, labels = e.heldout
        train_images, train_labels = probe_training_set(cfg, e.resolution)
        tokenizer = e.load_tokenizer()
        result[method] = {
            "eval_network_accuracy_on_originals": builtin_class_accuracy(images, labels, network=e.eval_network),
            "eval_network_accuracy_on_reconstructions": builtin_class_accuracy(
                e.reconstruct(tokenizer, images), labels, network=e.eval_network),
            "latent_probe": _probes(e.encode(tokenizer, train_images), train_labels, e.encode(tokenizer, images), labels),
        }
        if method == "aligntok":
            encoder = load_encoder(cfg.tokenizer.model.encoder).eval()
            from aligntok.eval.images import from_uint8

            with torch.inference_mode():
                tokens = [encoder(from_uint8(x)) for x in (train_images, images)]
            result["stand-in encoder tokens"] = {"latent_probe": _probes(tokens[0], train_labels, tokens[1], labels)}
        print(method, json.dumps(result[method]), flush=True)
    return result


def longer_dit(rcfg: ReproduceConfig, run: Path, steps: int) -> dict[str, dict]:
    result = {}
    for method in ("aligntok", "vae"):
        cfg = for_method(seeded(rcfg.experiment, rcfg.seeds[0]), method)
        train = dataclasses.replace(cfg.dit.train, steps=steps, ckpt_every=max(1, steps // 4))
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, train=train))
        source = Experiment(cfg, run / "runs" / method / f"seed{rcfg.seeds[0]}")
        e = Experiment(cfg, run / "diagnostics" / f"{method}_dit{steps}")
        if not (e.tokenizer_dir() / "config.json").is_file():
            shutil.copytree(source.tokenizer_dir(), e.tokenizer_dir())
        e.use_heldout(*source.heldout)
        e.use_eval_network(source.eval_network)
        e.train_dit()
        guided = cfg.eval.sampler
        unguided = dataclasses.replace(guided, cfg_scale=1.0)
        result[method] = {
            str(step): {
                "guided": e.evaluate_samples(f"guided_step{step}", guided, checkpoint=path),
                "unguided": e.evaluate_samples(f"unguided_step{step}", unguided, checkpoint=path),
            }
            for step, path in e.dit_checkpoints()
        }
        for step, r in result[method].items():
            print(method, step, {k: (round(v["gfd"], 3), round(v["class_accuracy"], 3)) for k, v in r.items()}, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an `aligntok reproduce` output folder")
    parser.add_argument("--dit-steps", type=int, default=4000, help="training steps of the longer DiTs (0: skip)")
    parser.add_argument("--out", type=Path, help="JSON output (default RUN/diagnostics.json)")
    args = parser.parse_args()
    rcfg = load_config(ReproduceConfig, args.run / "reproduce.yaml")
    result = {"class_information": class_information(rcfg, args.run)}
    if args.dit_steps:
        result["longer_dit"] = longer_dit(rcfg, args.run, args.dit_steps)
    out = args.out or args.run / "diagnostics.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
