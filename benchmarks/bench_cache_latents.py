"""`aligntok cache-latents` throughput against the tokenizer's encode alone, by processes and workers.

    python benchmarks/bench_cache_latents.py                                  # tiny tokenizer, 64 px
    python benchmarks/bench_cache_latents.py --tokenizer paper --resolution 256 --images 64 --batch-size 16 \\
        --procs 1 --workers 0 2                                               # DINOv2-L/14 + f16d32 decoder
    python benchmarks/bench_cache_latents.py --profile                        # where one process's time goes

Data: ``builtin:shapes`` (rendered on the fly) and a folder of JPEGs that the benchmark writes first (class
subfolders, ``--jpeg-size`` pixels, quality 90: decoded, box-halved, bicubic-resized and center-cropped as
every image is). Tokenizers have random weights (time does not depend on them): ``tiny`` is a 1-block,
32-wide ViT with 16 px patches (the CI-sized setting, where the data path is what costs), ``paper`` the
DINOv2-L/14 architecture with the adapter and f16d32 decoder of ``bench_tokenizer.py``.

Every (data, processes, workers) runs ``cache_latents`` -- the function behind the command -- in a fresh
process (``torch.distributed.run --nproc_per_node N``, gloo, for N > 1) into a fresh cache directory, with
``--threads`` intra-op threads per process (default: the cores / N). Printed per row: images/s of the call on rank 0 (after
process start, imports and one tokenizer load, from before the call until every rank has returned) and of the whole command
(process start to exit). Anchors, measured in their own processes at the same batch size and threads:
``model`` -- ``tokenizer.encode`` of the plain and the flipped batch of ready tensors, which is all the
model work cache-latents does per batch; for N processes N times one process's rate with its share of the
threads -- and ``data`` -- cache-latents itself with an ``encode`` that only average-pools
the image, i.e. its data path alone (loading, decoding, resizing, collation, statistics, shard writing). ``of model`` = call images/s / model images/s: 1 means the data path costs nothing on top of the
model. Wall-clock numbers on a shared machine are indicative; run alone for real ones.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA_KINDS = ("builtin", "jpeg", "tars")


def build_tokenizer(kind: str):
    """A random AlignTok tokenizer: ``tiny`` (CI-sized) or ``paper`` (DINOv2-L/14, adapter, f16d32 decoder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from bench_tokenizer import build
    finally:
        sys.path.pop(0)
    if kind not in ("tiny", "paper"):
        raise ValueError(f"unknown tokenizer {kind!r}; choose tiny or paper")
    torch.manual_seed(0)
    return build("aligntok", tiny=kind == "tiny").eval()


def write_jpegs(folder: Path, count: int, size: tuple[int, int], classes: int = 10) -> Path:
    """``count`` JPEGs of ``builtin:shapes`` scenes (``size`` = width, height; class subfolders), quality 90."""
    from aligntok.data.builtin import ShapesDataset

    side = max(size)
    shapes = ShapesDataset(count, side, seed=1)
    for index in range(count):
        image, label, _ = shapes.load(index)
        target = folder / f"class{label % classes:02d}" / f"{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.resize(size).save(target, quality=90)
    return folder


def write_tars(folder: Path, jpegs: Path, per_tar: int) -> str:
    """The JPEG folder as WebDataset tars (``KEY.jpg`` + ``KEY.cls``, ``per_tar`` samples each); their brace spec."""
    import tarfile

    classes = sorted(p.name for p in jpegs.iterdir())
    files = sorted((path, classes.index(path.parent.name)) for path in jpegs.glob("*/*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [files[i : i + per_tar] for i in range(0, len(files), per_tar)]
    for number, chunk in enumerate(chunks):
        with tarfile.open(folder / f"{number:06d}.tar", "w") as tar:
            for path, label in chunk:
                tar.add(path, arcname=f"{path.stem}.jpg")
                cls = io.BytesIO(str(label).encode())
                info = tarfile.TarInfo(f"{path.stem}.cls")
                info.size = len(cls.getvalue())
                tar.addfile(info, cls)
    return str(folder / f"{{000000..{len(chunks) - 1:06d}}}.tar")


def data_spec(kind: str, args: argparse.Namespace, work: Path) -> str:
    """The data spec of ``kind``, writing the JPEG folder (and tars of it: one per ``--shard-size`` images) once."""
    if kind == "builtin":
        return "builtin:shapes"
    folder = work / "jpegs"
    if not folder.is_dir():
        write_jpegs(folder, args.images, tuple(args.jpeg_size))
    if kind == "jpeg":
        return str(folder)
    return write_tars(work / "tars", folder, args.shard_size)


# ---------------------------------------------------------------------------------------------
# Measurements, each in its own process
# ---------------------------------------------------------------------------------------------


def measure_cache(args: argparse.Namespace, *, model: bool = True) -> dict:
    """Seconds of one ``cache_latents`` call (rank 0, from a barrier before it until every rank returned).

    ``model=False``: the tokenizer's ``encode`` average-pools the image to the latent grid, leaving the data path alone
    (loading, decoding, resizing, collation, statistics and shard writing)."""
    from aligntok.data.latents import cache_latents
    from aligntok.models.tokenizer import AlignTokTokenizer
    from aligntok.training import distributed

    dist = distributed.init_distributed()
    tokenizer = AlignTokTokenizer.from_pretrained(args.tokenizer_dir)  # imports and file cache are not what we time
    if not model:
        channels, stride = tokenizer.latent_channels, tokenizer.stride
        # One pass over the pixels with non-degenerate statistics (cache-latents refuses a zero std).
        AlignTokTokenizer.encode = lambda self, x: F.avg_pool2d(x.mean(1, keepdim=True), stride).expand(-1, channels, -1, -1)
    dist.barrier()
    start = time.perf_counter()
    result = cache_latents(
        args.tokenizer_dir, args.data, args.out, resolution=args.resolution, batch_size=args.batch_size,
        shard_size=args.shard_size, num_workers=args.num_workers, builtin_size=args.images, progress=False,
    )
    dist.barrier()
    seconds = time.perf_counter() - start
    images = result.metadata["num_images"]
    distributed.destroy_distributed()
    return {"seconds": seconds, "images": images}


def measure_model(args: argparse.Namespace) -> dict:
    """Seconds per image of ``encode`` on the plain and the flipped batch (median of ``--repeats`` batches)."""
    from aligntok.models.tokenizer import AlignTokTokenizer

    tokenizer = AlignTokTokenizer.from_pretrained(args.tokenizer_dir).eval()
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution) * 2 - 1
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            tokenizer.encode(images).float().cpu()
            tokenizer.encode(images.flip(-1)).float().cpu()
            times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return {"seconds": times[len(times) // 2], "images": args.batch_size}


def measure_data(args: argparse.Namespace) -> dict:
    """Seconds of cache-latents with a free model: its data path alone."""
    return measure_cache(args, model=False)


MEASURES = {"cache": measure_cache, "model": measure_model, "data": measure_data}


def run_measure(args: argparse.Namespace, what: str, *, procs: int = 1, threads: int | None = None, **overrides) -> dict:
    """Run ``what`` in a fresh process (``procs`` of them under torch.distributed.run, each with ``threads``
    intra-op threads, by default ``--threads`` / ``procs``); its JSON plus the wall time."""
    settings = {**vars(args), **overrides}
    flags = [f"--measure={what}"]
    for key in ("tokenizer_dir", "data", "out", "resolution", "batch_size", "shard_size", "num_workers", "images",
                "repeats"):
        if settings.get(key) is not None:
            flags.append(f"--{key.replace('_', '-')}={settings[key]}")
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    threads = threads or args.threads or max(1, (os.cpu_count() or 1) // procs)
    src = str(Path(args.src).resolve()) if args.src else str(ROOT / "src")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([*launcher, str(Path(__file__).resolve()), *flags], capture_output=True, text=True, env=env,
                          check=False)  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"{what} with {procs} process(es) failed:\n{tail}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    return {**result, "wall": wall}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-cache-latents-") as tmp:
        work = Path(tmp)
        args.tokenizer_dir = str(work / "tokenizer")
        build_tokenizer(args.tokenizer).save_pretrained(args.tokenizer_dir)
        # The model alone with N processes: N x one process's encode rate with its share of the threads.
        model_rates = {}
        for procs in args.procs:
            model = run_measure(args, "model", procs=1, threads=args.threads or max(1, (os.cpu_count() or 1) // procs))
            model_rates[procs] = procs * model["images"] / model["seconds"]
        threads = f"{args.threads} thread(s) per process" if args.threads else "the cores split over the processes"
        print(f"cache-latents, {args.tokenizer} tokenizer, {args.resolution} px, batch {args.batch_size}, {args.images} images, "
              f"{threads}; model alone (encode plain + flipped), images/s: "
              + ", ".join(f"{rate:.4g} with {procs} process(es)" for procs, rate in model_rates.items()))  # fmt: skip
        print(f"{'data':>8} {'procs':>5} {'workers':>7} | {'data img/s':>10} | {'call img/s':>10} {'of model':>8} | {'command img/s':>13}")
        rows = []
        for kind in args.data_kinds:
            spec = data_spec(kind, args, work)
            for workers in args.workers:
                data = run_measure(args, "data", data=spec, num_workers=workers, out=str(work / f"data-{kind}-{workers}"))
                for procs in args.procs:
                    out = work / f"cache-{kind}-{procs}-{workers}"
                    cache = run_measure(args, "cache", procs=procs, data=spec, num_workers=workers, out=str(out))
                    model_rate = model_rates[procs]
                    row = {
                        "data": kind, "procs": procs, "workers": workers,
                        "data_images_per_s": data["images"] / data["seconds"],
                        "call_images_per_s": cache["images"] / cache["seconds"],
                        "command_images_per_s": cache["images"] / cache["wall"],
                        "model_images_per_s": model_rate,
                    }  # fmt: skip
                    rows.append(row)
                    print(f"{kind:>8} {procs:>5} {workers:>7} | {row['data_images_per_s']:10.4g} | "
                          f"{row['call_images_per_s']:10.4g} {row['call_images_per_s'] / model_rate:7.2f}x | "
                          f"{row['command_images_per_s']:13.4g}")  # fmt: skip
    return rows


def profile(args: argparse.Namespace) -> dict[str, float]:
    """One process, ``--workers`` first value: cumulative seconds of data loading, encoding and shard writing."""
    from aligntok.data.latents import cache_latents

    with tempfile.TemporaryDirectory(prefix="bench-cache-latents-") as tmp:
        work = Path(tmp)
        tokenizer_dir = work / "tokenizer"
        build_tokenizer(args.tokenizer).save_pretrained(tokenizer_dir)
        spec = data_spec(args.data_kinds[0], args, work)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        cache_latents(tokenizer_dir, spec, work / "cache", resolution=args.resolution, batch_size=args.batch_size,
                      shard_size=args.shard_size, num_workers=args.workers[0], builtin_size=args.images, progress=False)
        profiler.disable()
        total = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    phases = {"total": total}
    wanted = {  # phase: (file suffix, function); cumulative seconds, summed over matches
        "load (map-style)": ("data/images.py", "__getitem__"), "load (tars)": ("data/latents.py", "_tar_batches"),
        "decode": ("data/images.py", "load_image"), "render (builtin)": ("data/builtin.py", "render_scene"),
        "crop+resize": ("data/images.py", "center_crop"), "to_tensor": ("data/images.py", "to_tensor"),
        "collate": ("data/loader.py", "collate_samples"), "encode": ("models/tokenizer.py", "encode"),
        "write": ("aligntok/io.py", "save_safetensors"),
    }  # fmt: skip
    for (file, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for phase, (suffix, function) in wanted.items():
            if name == function and file.endswith(suffix):
                phases[phase] = phases.get(phase, 0.0) + cumulative
    listing = io.StringIO()
    stats.stream = listing  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(args.profile_top)
    print(listing.getvalue())
    print(f"{args.data_kinds[0]}, {args.images} images, workers {args.workers[0]}: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    return phases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="tiny", choices=("tiny", "paper"))
    parser.add_argument("--data-kinds", nargs="+", default=list(DATA_KINDS), choices=DATA_KINDS)
    parser.add_argument("--images", type=int, default=512, help="images cached per run (builtin size; JPEGs written)")
    parser.add_argument("--resolution", type=int, default=64, help="center-crop side in px (multiple of 16)")
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"), help="JPEG size (ImageNet-like)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="processes (torch.distributed.run, gloo)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers per process")
    parser.add_argument("--threads", type=int, help="intra-op threads per process (default: the cores / processes; "
                        "1 avoids OpenMP spinning against other jobs on a shared machine)")
    parser.add_argument("--repeats", type=int, default=5, help="batches timed for the model anchor (median)")
    parser.add_argument("--src", help="aligntok source tree to measure (default: this checkout's src; e.g. an older commit's export)")
    parser.add_argument("--profile", action="store_true", help="cProfile one in-process run instead of the table")
    parser.add_argument("--profile-top", type=int, default=25)
    # Entry of the measuring subprocesses.
    parser.add_argument("--measure", choices=tuple(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> list[dict] | dict | None:
    args = build_parser().parse_args(argv)
    if args.measure:
        result = MEASURES[args.measure](args)
        if os.environ.get("RANK", "0") == "0":  # every rank measured the same interval
            print(json.dumps(result))
        return None
    if args.profile:
        return profile(args)
    return run(args)


if __name__ == "__main__":
    main()
