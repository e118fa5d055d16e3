"""``python -m aligntok.standins.build``: (re)build the stand-ins shipped as package data, from fixed seeds.

Usage: ``python -m aligntok.standins.build [--out DIR] [NAME ...]``. Without ``--out`` the directories
land in the package (``aligntok/standins/shipped/``, what a release ships); with it, under ``DIR`` (how a
test checks that rebuilding reproduces the shipped weights). NAMEs are :data:`SHIPPED` entries (default:
all). Training runs single-threaded on the CPU, because another thread count or device sums in another
order and gives other bits; on the same torch version and CPU kind a rebuild is bitwise identical.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from aligntok.standins.cache import SHIPPED_DIR
from aligntok.standins.encoder import ensure_standin_encoder
from aligntok.standins.evalnet import ensure_eval_network

#: What the package ships: name -> (kind, preset name in STANDIN_ENCODERS or EVAL_NETWORKS).
SHIPPED: dict[str, tuple[str, str]] = {
    "dinov2-shapes-p8": ("encoder", "dinov2-shapes-p8"),
    "dinov2-centered-p8": ("encoder", "dinov2-centered-p8"),
    "shapes-easy": ("eval", "shapes-easy"),
}
BUILD_THREADS = 1


def build(out: Path = SHIPPED_DIR, names: Sequence[str] | None = None, *, progress: bool = True) -> list[Path]:
    """Train the named shipped stand-ins into ``out`` (skipping complete ones); returns their directories."""
    unknown = sorted(set(names or ()) - set(SHIPPED))
    if unknown:
        raise ValueError(f"unknown shipped stand-in {unknown[0]!r}; available: {', '.join(SHIPPED)}")
    if torch.cuda.is_available():
        raise RuntimeError("build the shipped stand-ins on a CPU-only machine (CUDA_VISIBLE_DEVICES=)")
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        built = []
        for name in names or SHIPPED:
            kind, preset = SHIPPED[name]
            ensure = ensure_standin_encoder if kind == "encoder" else ensure_eval_network
            built.append(ensure(preset, progress=progress, root=Path(out)))
        return built
    finally:
        torch.set_num_threads(threads)
        for lock in Path(out).glob(".*.lock"):  # only needed while building; never shipped
            lock.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aligntok.standins.build", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"shipped stand-ins to build (default: all of {', '.join(SHIPPED)})")
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="folder to build into (default: the package's)")
    args = parser.parse_args(argv)
    try:
        for path in build(args.out, args.names):
            print(path)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
