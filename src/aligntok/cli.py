"""The `aligntok` command: thin subcommands, each a few lines over a library function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aligntok import __version__


def _train_tokenizer(args: argparse.Namespace) -> None:
    from aligntok.config import load_config, save_config
    from aligntok.training.stages import STAGES, TokenizerTrainConfig, train_tokenizer

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, args.out / "config.yaml")
    stages = (args.stage,) if args.stage else tuple(STAGES)
    for number, path in train_tokenizer(cfg, args.out, stages).items():
        print(f"stage {number}: {path}")


def _reconstruct(args: argparse.Namespace) -> None:
    from aligntok.inference import reconstruct_to_pngs

    written = reconstruct_to_pngs(args.tokenizer, args.images, args.out, num=args.num, resolution=args.resolution)
    print(f"wrote {written} input/reconstruction pairs to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligntok",
        description="AlignTok: foundation encoders aligned into image tokenizers for latent diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"aligntok {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-tokenizer", help="train the tokenizer: stages 1, 2, 3 in order (or --stage N)")
    p.add_argument("config", type=Path, help="YAML config (e.g. configs/tokenizer/tiny.yaml)")
    p.add_argument("--out", type=Path, required=True, help="run folder; re-running with it resumes")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), help="run only this stage")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stage1.train.steps=100")
    p.set_defaults(func=_train_tokenizer)

    p = sub.add_parser("reconstruct", help="write input/reconstruction PNG pairs")
    p.add_argument("tokenizer", help="tokenizer directory or hub id")
    p.add_argument("images", help="data spec: image folder, shards, or builtin:NAME")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--num", type=int, default=16, help="number of images")
    p.add_argument("--resolution", type=int, default=256, help="square crop side in pixels")
    p.set_defaults(func=_reconstruct)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere after the subcommand, also after its options.
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    from aligntok.errors import USER_ERRORS

    try:
        args.func(args)
    except USER_ERRORS as e:
        # Bad input or config: one line, no stack trace (use -v to see where it came from).
        if args.verbose:
            raise
        print(f"aligntok {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
