"""`aligntok evaluate t2i` and `aligntok evaluate geneval-summary`: thin, like every subcommand; no torch import here."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def _evaluate_t2i(args: argparse.Namespace) -> None:
    from aligntok.eval.results import output_path, publish_result
    from aligntok.eval.t2i import evaluate_t2i

    out = output_path(args.out, args.samples, "t2i")  # checked before the long run
    result = evaluate_t2i(args.samples, args.prompts, clip=args.clip, pickscore=args.pickscore, hpsv2=args.hpsv2,
                          hpsv2_arch=args.hpsv2_arch, ref=args.ref,
                          inception_weights=args.inception_weights, allow_download=not args.offline,
                          batch_size=args.batch_size)
    publish_result("t2i", result, out)


def _evaluate_geneval_summary(args: argparse.Namespace) -> None:
    from aligntok.eval.geneval import evaluate_geneval_summary
    from aligntok.eval.results import output_path, publish_result

    out = output_path(args.out, args.results, "geneval")  # checked before the long run
    publish_result("geneval", evaluate_geneval_summary(args.results), out)


def add_t2i_evaluate_parsers(kinds: argparse._SubParsersAction, common: Callable, offline_option: Callable) -> None:
    """The ``t2i`` and ``geneval-summary`` kinds of `aligntok evaluate` (``common`` adds --out and --batch-size)."""
    p = kinds.add_parser("t2i", help="CLIP score, PickScore, HPSv2 and FID of text-to-image samples against their prompts")
    p.add_argument("--samples", required=True, type=Path,
                   help="sample-t2i output folder (00000.png ..., sampling.json) or a GenEval-layout folder")
    p.add_argument("--prompts", type=Path,
                   help="prompts, one per image in file-name order (default: the folder's sampling.json or GenEval metadata)")
    p.add_argument("--ref", help="reference images for FID: a folder or .npz of the captions' real images, "
                                 "center-cropped to the generation size")
    p.add_argument("--clip", help="CLIPModel directory or hub id for the CLIP score (e.g. openai/clip-vit-large-patch14)")
    p.add_argument("--pickscore", help="PickScore CLIPModel directory or hub id (yuvalkirstain/PickScore_v1 with "
                                       "the CLIP-H processor files beside it)")
    p.add_argument("--hpsv2", help="HPSv2 checkpoint: a file or ORG/NAME:FILE on the hub (xswu/HPSv2:HPS_v2.1_compressed.pt); "
                                   "needs open_clip (pip install 'aligntok[t2i-scorers]')")
    p.add_argument("--hpsv2-arch", default="ViT-H-14", help="OpenCLIP architecture of the HPSv2 checkpoint (default: %(default)s)")
    p.add_argument("--inception-weights", type=Path, help="Inception file for FID (default: torch-fidelity's cache)")
    common(p, 32)
    offline_option(p)
    p.set_defaults(func=_evaluate_t2i)

    p = kinds.add_parser("geneval-summary", help="per-task and overall GenEval scores of GenEval's results.jsonl")
    p.add_argument("results", type=Path, help="results.jsonl written by GenEval's evaluation/evaluate_images.py")
    p.add_argument("--out", type=Path, help="JSON file (default: beside the input, INPUT.eval-geneval.json)")
    p.set_defaults(func=_evaluate_geneval_summary)
