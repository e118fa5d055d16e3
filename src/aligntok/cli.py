"""The `aligntok` command: thin subcommands, each a few lines over a library function."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from aligntok import __version__
from aligntok.cli_ecosystem import add_ecosystem_parsers
from aligntok.cli_t2i_eval import add_t2i_evaluate_parsers


def _train_tokenizer(args: argparse.Namespace) -> None:
    from aligntok.config import load_config, save_config
    from aligntok.training.stages import (
        TokenizerTrainConfig,
        check_finished_stages,
        train_tokenizer,
    )

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    recorded = args.out / "config.yaml"
    if recorded.is_file():  # a finished stage is skipped: refuse settings it was not made with
        check_finished_stages(load_config(TokenizerTrainConfig, recorded), cfg, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, recorded)
    stages = (args.stage,) if args.stage else None  # None: every stage of the config's method
    for number, path in train_tokenizer(cfg, args.out, stages).items():
        print(f"stage {number}: {path}")


def _reconstruct(args: argparse.Namespace) -> None:
    from aligntok.inference import reconstruct_to_pngs

    written, skipped = reconstruct_to_pngs(args.tokenizer, args.images, args.out, num=args.num, resolution=args.resolution)
    note = f" ({len(skipped)} unreadable images skipped, first: {skipped[0]})" if skipped else ""
    print(f"wrote {written} input/reconstruction pairs to {args.out}{note}")


def _evaluate_recon(args: argparse.Namespace) -> None:
    from aligntok.eval.commands import evaluate_reconstruction
    from aligntok.eval.results import output_path

    out = output_path(args.out, args.tokenizer, "recon")  # checked before the long run
    result = evaluate_reconstruction(
        args.tokenizer, args.data, resolution=args.resolution, num=args.num, batch_size=args.batch_size,
        num_workers=args.num_workers, seed=args.seed, lpips_net=None if args.lpips == "none" else args.lpips,
        lpips_backbone_weights=args.lpips_backbone_weights, lpips_pretrained_backbone=not args.lpips_random_backbone,
        rfid=not args.no_rfid, inception_weights=args.inception_weights, allow_download=not args.offline,
    )
    _publish("recon", result, out)


def _evaluate_gen(args: argparse.Namespace) -> None:
    from aligntok.eval import evaluate_generation
    from aligntok.eval.results import output_path

    out = output_path(args.out, args.samples, "gen")  # checked before the long run
    result = evaluate_generation(
        args.samples, args.ref, inception_weights=args.inception_weights,
        dinov2=None if args.dinov2 == "none" else args.dinov2, batch_size=args.batch_size, is_split_size=args.is_split_size,
        allow_download=not args.offline, progress=True,
    )
    _publish("gen", result, out)


def _evaluate_probe(args: argparse.Namespace) -> None:
    from aligntok.eval.commands import evaluate_tokenizer_probe
    from aligntok.eval.results import output_path

    out = output_path(args.out, args.tokenizer, "probe")  # checked before the long run
    result = evaluate_tokenizer_probe(
        args.tokenizer, args.data, test_data=args.test_data, resolution=args.resolution, num=args.num,
        test_num=args.test_num, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
        cknna_k=args.cknna_k, cknna_samples=args.cknna_samples, cknna_encoder=args.cknna_encoder,
    )
    _publish("probe", result, out)


def _demo(args: argparse.Namespace) -> None:
    from aligntok.experiments.demo import run_demo

    report = run_demo(args.out, preset=args.preset, overrides=args.overrides, threads=args.threads)
    print(f"report: {report}")


def _demo_t2i(args: argparse.Namespace) -> None:
    from aligntok.experiments.demo_t2i import run_demo_t2i
    from aligntok.experiments.pipeline import torch_threads

    with torch_threads(args.threads):
        print(f"report: {run_demo_t2i(args.out, preset=args.preset, overrides=args.overrides)}")


def _reproduce(args: argparse.Namespace) -> None:
    from aligntok.experiments.pipeline import torch_threads
    from aligntok.experiments.reproduce import run_reproduce
    from aligntok.experiments.reproduce_t2i import PRESETS as T2I_PRESETS
    from aligntok.experiments.reproduce_t2i import run_reproduce_t2i

    run = run_reproduce_t2i if args.preset in T2I_PRESETS else run_reproduce
    with torch_threads(args.threads):
        report = run(args.out, preset=args.preset, overrides=args.overrides)
    print(f"report: {report}")


def _publish(kind: str, result: dict, out: Path) -> None:
    from aligntok.eval.results import publish_result

    publish_result(kind, result, out)


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """`aligntok evaluate recon|gen|probe|t2i|geneval-summary`."""
    evaluate = sub.add_parser("evaluate", help="metrics with the field's protocols: recon, gen, probe, t2i, geneval-summary (JSON output)")
    kinds = evaluate.add_subparsers(dest="evaluation", required=True, metavar="KIND")

    def common(p: argparse.ArgumentParser, batch_size: int) -> None:
        p.add_argument("--out", type=Path, help="JSON file (default: beside the input, INPUT.eval-KIND.json)")
        p.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (per process)")

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id")
        p.add_argument("--data", required=True, help="data spec: image folder, shards, or builtin:NAME")
        p.add_argument("--resolution", type=int, default=256, help="ADM center-crop side in pixels")
        p.add_argument("--num", type=int, help="images to use (default: all; fewer: a seeded random subset). "
                       "Under torchrun put -- before the subcommand: torchrun takes --num for its --numa-binding")
        p.add_argument("--num-workers", type=int, default=4, help="data loading processes per rank")
        p.add_argument("--seed", type=int, default=0, help="seed of the image subset (and of the probe split)")

    def offline_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--offline", action="store_true",
                       help="never download weights; a missing file is an error saying where to put it")

    p = kinds.add_parser("recon", help="PSNR, SSIM, LPIPS and rFID of a tokenizer's reconstructions")
    data_options(p)
    common(p, 32)
    p.add_argument("--inception-weights", type=Path, help="Inception file (default: torch-fidelity's cache)")
    p.add_argument("--no-rfid", action="store_true", help="skip rFID (no Inception weights needed)")
    p.add_argument("--lpips", choices=("vgg", "alex", "none"), default="vgg", help="LPIPS trunk, or none to skip")
    p.add_argument("--lpips-backbone-weights", type=Path,
                   help="torchvision ImageNet weights of the LPIPS trunk (default: torchvision's cache)")
    p.add_argument("--lpips-random-backbone", action="store_true",
                   help="seeded random LPIPS trunk (tests and demos only: numbers not comparable)")
    offline_option(p)
    p.set_defaults(func=_evaluate_recon)

    p = kinds.add_parser("gen", help="FID, IS, precision/recall (ADM protocol) and FD_DINOv2 of samples")
    p.add_argument("--samples", required=True, help="ADM .npz (arr_0 uint8 NHWC) or a folder of PNGs")
    p.add_argument("--ref", required=True, help="ADM reference batch .npz (images and/or mu/sigma) or image folder")
    common(p, 100)
    p.add_argument("--inception-weights", type=Path, help="Inception file (default: torch-fidelity's cache)")
    p.add_argument("--dinov2", default="auto",
                   help="DINOv2 for FD_DINOv2: hub id or directory, auto (ViT-L/14 if cached) or none")
    p.add_argument("--is-split-size", type=int, default=5000,
                   help="samples per Inception Score chunk (ADM: 5000, so 50,000 samples give 10 chunks)")
    offline_option(p)
    p.set_defaults(func=_evaluate_gen)

    p = kinds.add_parser("probe", help="linear probe on pooled latents and CKNNA with a fixed reference encoder")
    data_options(p)
    common(p, 64)
    p.add_argument("--test-data", help="held-out data spec (default: a seeded 20%% split of --data)")
    p.add_argument("--test-num", type=int, help="test images to use (default: all)")
    p.add_argument("--cknna-k", type=int, default=10, help="nearest neighbours of CKNNA")
    p.add_argument("--cknna-samples", type=int, default=10_000, help="images in CKNNA's seeded subset (O(n^2) memory)")
    p.add_argument("--cknna-encoder", default="auto",
                   help="the fixed pretrained encoder CKNNA measures every tokenizer against: auto (DINOv2-L/14 if "
                        "cached), a hub id, a directory, standin:NAME, or none")
    p.set_defaults(func=_evaluate_probe)
    add_t2i_evaluate_parsers(kinds, common, offline_option)


def _cache_latents(args: argparse.Namespace) -> None:
    from aligntok.data.latents import cache_latents
    from aligntok.training.distributed import destroy_distributed, is_main

    result = cache_latents(
        args.tokenizer, args.data, args.out, resolution=args.resolution, batch_size=args.batch_size,
        shard_size=args.shard_size, num_workers=args.num_workers, builtin_size=args.builtin_size,
        captions=args.captions,
    )
    if is_main():
        meta = result.metadata
        print(f"cached {meta['num_images']} images ({meta['skipped_images']} skipped) in {result.directory}; "
              f"latent mean/std recorded in {meta['tokenizer']}")
    destroy_distributed()


def _train_from_config(args: argparse.Namespace, config_class: type, train: Callable) -> None:
    """Load ``args.config`` with its overrides, train, keep the resolved config beside the run, name the model.
    (The config is written once training accepted it: a refused run leaves the recorded one as it was; each
    checkpoint holds its own copy meanwhile.)"""
    from aligntok.config import load_config, save_config
    from aligntok.training.distributed import destroy_distributed, is_main

    cfg = load_config(config_class, args.config, args.overrides)
    path = train(cfg, args.out)
    if is_main():
        save_config(cfg, args.out / "config.yaml")
        print(f"model: {path}")
    destroy_distributed()


def _train_dit(args: argparse.Namespace) -> None:
    from aligntok.diffusion.training import DiTTrainConfig, train_dit

    _train_from_config(args, DiTTrainConfig, train_dit)


def _class_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class numbers like 1,2,3, got {text!r}") from None


def _cfg_channels(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of channels or 'all', got {text!r}") from None


def _sample(args: argparse.Namespace) -> None:
    from aligntok.diffusion.sampling import (
        SampleConfig,
        recorded_sampler,
        sample_to_directory,
    )
    from aligntok.training.distributed import destroy_distributed, is_main

    given = {
        "method": args.method, "num_steps": args.steps, "cfg_scale": args.cfg_scale,
        "cfg_interval_start": args.interval_start, "timestep_shift": args.shift, "cfg_channels": args.cfg_channels,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("cfg_channels") == "all":
        given["cfg_channels"] = None
    # Unset flags: the settings train-dit recorded with the DiT, else SamplerConfig's defaults.
    sampler = recorded_sampler(args.dit, **given)
    config = SampleConfig(num=args.num, seed=args.seed, labels=args.labels, batch_size=args.batch_size, sampler=sampler)
    result = sample_to_directory(args.dit, args.tokenizer, args.out, config, compile_dit=args.compile)
    if is_main():
        print(f"wrote {args.num} samples to {result.samples}, {result.grid} and {result.directory / 'sampling.json'}")
    destroy_distributed()


def _train_t2i(args: argparse.Namespace) -> None:
    from aligntok.diffusion.t2i_training import T2ITrainConfig, train_t2i

    _train_from_config(args, T2ITrainConfig, train_t2i)


def _sample_t2i(args: argparse.Namespace) -> None:
    from aligntok.diffusion.samplers import SamplerConfig
    from aligntok.diffusion.t2i_sampling import (
        T2ISampleConfig,
        read_prompts,
        sample_t2i,
    )
    from aligntok.training.distributed import destroy_distributed, is_main

    geneval = None
    if args.geneval is not None:
        from aligntok.eval.geneval import read_metadata

        geneval = read_metadata(args.geneval)
        prompts = [entry["prompt"] for entry in geneval]
    else:
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    sampler = SamplerConfig(method=args.method, num_steps=args.steps, cfg_scale=args.cfg_scale,
                            cfg_interval_start=args.interval_start, timestep_shift=args.shift)
    config = T2ISampleConfig(height=args.height, width=args.width, seed=args.seed, batch_size=args.batch_size,
                             sampler=sampler)
    per_prompt = args.samples_per_prompt or (4 if geneval is not None else 1)
    if geneval is None and per_prompt != 1:
        raise ValueError("--samples-per-prompt needs --geneval (one image per prompt otherwise)")
    sample_t2i(args.model, args.tokenizer, prompts, args.out, config, geneval=geneval, samples_per_prompt=per_prompt)
    if is_main():
        layout = "in GenEval's folder layout" if geneval is not None else "grid.png"
        print(f"wrote {len(prompts) * per_prompt} images, {layout} and sampling.json to {args.out}")
    destroy_distributed()


def _import_lightningdit(args: argparse.Namespace) -> None:
    from aligntok.models.lightningdit_import import (
        import_lightningdit_checkpoint,
        preset_of,
    )

    model = import_lightningdit_checkpoint(args.checkpoint, args.out, preset=args.preset)
    count = sum(p.numel() for p in model.parameters())
    c = model.config
    preset = preset_of(depth=c.depth, hidden_size=c.hidden_size, num_heads=c.num_heads, patch_size=c.patch_size)
    print(f"wrote {args.out}: {preset}, {count / 1e6:.1f}M parameters, "
          f"{model.config.in_channels}x{model.config.input_size}x{model.config.input_size} latents")


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
    p.add_argument("--num", type=int, default=16, help="at most this many images (a seeded subset when the data holds more)")
    p.add_argument("--resolution", type=int, default=256, help="square crop side in pixels")
    p.set_defaults(func=_reconstruct)
    _add_evaluate_parser(sub)
    _add_diffusion_parsers(sub)
    _add_experiment_parsers(sub)
    add_ecosystem_parsers(sub)
    _add_t2i_parsers(sub)
    return parser


def _add_t2i_parsers(sub: argparse._SubParsersAction) -> None:
    """`aligntok train-t2i` and `sample-t2i`: text-to-image on tokenizer latents."""
    p = sub.add_parser("train-t2i", help="train the FLUX-architecture text-to-image model; re-running resumes")
    p.add_argument("config", type=Path, help="YAML config (e.g. configs/t2i/tiny.yaml)")
    p.add_argument("--out", type=Path, required=True, help="run folder: RUN/model (EMA weights) and RUN/train")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.set_defaults(func=_train_t2i)

    p = sub.add_parser("sample-t2i", help="images from prompts: one PNG each, grid.png and the settings")
    p.add_argument("--model", type=Path, required=True, help="T2I model directory (RUN/model of train-t2i)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer whose latents the model was trained on")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="one prompt")
    given.add_argument("--prompts", type=Path, help="a file: one prompt per line, or .json/.jsonl with 'prompt'")
    given.add_argument("--geneval", type=Path, metavar="METADATA.jsonl",
                       help="GenEval's evaluation_metadata.jsonl: write GenEval's folder layout (OUT/00000/samples/0000.png)")
    p.add_argument("--samples-per-prompt", type=int, help="images per prompt with --geneval (default 4, GenEval's)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--height", type=int, help="pixels (default: the training resolution)")
    p.add_argument("--width", type=int, help="pixels (default: the training resolution)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale against the empty caption (1 = none)")
    p.add_argument("--steps", type=int, default=30, help="integration steps")
    p.add_argument("--seed", type=int, default=0, help="prompt i's noise is seeded from (seed, i)")
    p.add_argument("--method", default="euler", help="euler or heun (ODE), euler_maruyama (SDE)")
    p.add_argument("--interval-start", type=float, default=0.0, help="guidance only for t >= this (t=0 is noise)")
    p.add_argument("--shift", type=float, default=0.0, help="timestep shift s (t=0 noise); 0 = FLUX's rule for the token count, 1 = none")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per model call")
    p.set_defaults(func=_sample_t2i)


def _add_experiment_parsers(sub: argparse._SubParsersAction) -> None:
    """`aligntok demo` and `aligntok reproduce`: whole pipelines on the built-in data, offline."""
    p = sub.add_parser("demo", help="the whole method on built-in data in minutes, offline: DIR/report.html")
    p.add_argument("--out", type=Path, default=Path("aligntok-demo"), help="output folder; re-running resumes")
    p.add_argument("--preset", choices=("demo", "minimal"), default="demo",
                   help="demo (default, ~5 min on 2 CPU cores) or minimal (seconds; a smoke test)")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads for torch (default 2: the demo's budget is a 2-core machine); 0 keeps torch's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. dit.train.steps=500")
    p.set_defaults(func=_demo)

    p = sub.add_parser("demo-t2i", help="text-to-image in miniature, offline: FLUX-tiny on scenes, miniature GenEval, report.html")
    p.add_argument("--out", type=Path, default=Path("aligntok-demo-t2i"), help="output folder; re-running resumes")
    p.add_argument("--preset", choices=("demo", "minimal"), default="demo", help="demo (default) or minimal (a smoke test)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default 0: torch's own setting)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. t2i.train.steps=300")
    p.set_defaults(func=_demo_t2i)

    p = sub.add_parser("reproduce", help="the paper's comparisons in miniature: AlignTok vs baselines, seeds, ablations")
    p.add_argument("--out", type=Path, default=Path("aligntok-reproduce"), help="output folder; re-running resumes")
    p.add_argument("--preset", choices=("quick", "full", "minimal", "t2i-quick", "t2i-full", "t2i-minimal"),
                   default="quick", help="class-to-image: quick (<20 min on 2 CPU cores), full (<2 h) or minimal (a "
                   "smoke test); text-to-image (AlignTok vs FLUX VAE vs VAE on scenes): t2i-quick, t2i-full, t2i-minimal")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default 0: torch's own setting)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every experiment's config")
    p.set_defaults(func=_reproduce)


def _add_diffusion_parsers(sub: argparse._SubParsersAction) -> None:
    """`aligntok cache-latents`, `train-dit`, `sample` and `import-lightningdit`.

    Nothing here imports torch (so --help stays fast): sampler defaults and the preset names are checked
    by SamplerConfig and the importer, which name the valid choices in their one-line errors.
    """
    p = sub.add_parser("cache-latents", help="encode a dataset once (plain and flipped) and record latent statistics")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer directory (its config gets the mean/std), or a hub id / diffusers AutoencoderKL "
                        "(ORG/NAME[:SUBFOLDER]; its aligntok copy OUT/tokenizer gets them)")
    p.add_argument("--data", required=True, help="data spec: image folder, shards, or builtin:NAME")
    p.add_argument("--out", type=Path, required=True, help="cache directory; re-running with it resumes")
    p.add_argument("--resolution", type=int, default=256, help="ADM center-crop side in pixels")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (per process)")
    p.add_argument("--shard-size", type=int, default=10000, help="images per cache shard (WebDataset input: one per tar)")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes per rank")
    p.add_argument("--builtin-size", type=int, default=10000, help="images in a builtin:NAME dataset")
    p.add_argument("--captions", action="store_true", help="keep each caption (and its flipped form) for train-t2i")
    p.set_defaults(func=_cache_latents)

    p = sub.add_parser("train-dit", help="train LightningDiT on cached (or on-the-fly) latents; re-running resumes")
    p.add_argument("config", type=Path, help="YAML config (e.g. configs/dit/tiny.yaml)")
    p.add_argument("--out", type=Path, required=True, help="run folder: RUN/model (EMA weights) and RUN/train")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.set_defaults(func=_train_dit)

    p = sub.add_parser("sample", help="sample images: PNG grid, ADM .npz and the settings",
                       description="Sample a trained LightningDiT and decode with its tokenizer. Sampler options "
                                   "left unset take the values train-dit recorded with the DiT (its config's "
                                   "`sample` section), else the defaults below.")
    p.add_argument("--dit", type=Path, required=True, help="LightningDiT directory (RUN/model of train-dit)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer whose latents the DiT was trained on")
    p.add_argument("--num", type=int, required=True,
                   help="number of samples (under torchrun put -- before `sample`: torchrun reads --num as --numa-binding)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--cfg-scale", type=float,
                   help="guidance scale (default 1 = none; paper: ~10 at 64 ep, 6.7 at 800, tuned with --cfg-channels 3)")
    p.add_argument("--cfg-channels", type=_cfg_channels,
                   help="guide only the first N latent channels, or 'all' (default all; the reference LightningDiT "
                        "and the paper's scales guide 3)")
    p.add_argument("--steps", type=int, help="integration steps (default 250)")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise is seeded from (seed, i)")
    p.add_argument("--method", help="euler (default) or heun (ODE), euler_maruyama (SDE)")
    p.add_argument("--labels", type=_class_list, help="comma-separated classes, repeated over the samples (default: i %% num_classes)")
    p.add_argument("--interval-start", type=float,
                   help="guidance only for t >= this, t=0 being noise (default 0.10; reference: 0.10 at 64 ep, 0.125 at 800)")
    p.add_argument("--shift", type=float, help="timestep shift s; 0 or 1 = none (default 0.3)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per model call")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT's blocks (pays off for many samples; on CPU needs a C++ compiler)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("import-lightningdit", help="convert a reference LightningDiT checkpoint (EMA weights if present)")
    p.add_argument("checkpoint", type=Path, help="torch file holding 'model' and/or 'ema' state dicts")
    p.add_argument("--out", type=Path, required=True, help="output directory (LightningDiT.save_pretrained format)")
    p.add_argument("--preset", help="size preset, LightningDiT-{S,B,L,XL,1p0B,1p6B}/{1,2} (default: read from the "
                   "weights' depth, width and patch size; when given, checked against them)")
    p.set_defaults(func=_import_lightningdit)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m aligntok.cli -- COMMAND ...` keeps torchrun off our options
        argv = argv[1:]
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
    from aligntok.errors import ENVIRONMENT_ERRORS, USER_ERRORS, first_line

    try:
        args.func(args)
    except USER_ERRORS as e:
        # Bad input or config: one line, no stack trace (use -v to see where it came from).
        if args.verbose:
            raise
        print(f"aligntok {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except ENVIRONMENT_ERRORS as e:
        # The machine failed under the run (full disk, I/O error, permissions): every write is atomic, so
        # what was complete is intact and the same command picks up from there.
        if args.verbose:
            raise
        unwritable = isinstance(e, PermissionError) or getattr(e, "errno", None) == errno.EROFS
        hint = f"{_RERUN} once the output is writable" if unwritable else _RERUN
        print(f"aligntok {args.command}: error: {first_line(e)}; {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"aligntok {args.command}: interrupted; {_RERUN}", file=sys.stderr)
        return 130
    except Exception as e:
        if not _interrupted(e):
            raise
        # Ctrl-C inside a writer (torch.save's zip file) can surface as the writer's own error on cleanup
        print(f"aligntok {args.command}: interrupted; {_RERUN}", file=sys.stderr)
        return 130
    return 0


def _interrupted(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the errors ``error`` was raised while handling."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


_RERUN = "complete checkpoints and results are intact: re-run the same command to finish"


if __name__ == "__main__":
    sys.exit(main())
