"""The `aligntok` subcommands that connect aligntok to the ecosystem: released VA-VAE checkpoints, diffusers
pipelines and the Hugging Face Hub. Thin, like every subcommand; nothing here imports torch."""

from __future__ import annotations

import argparse
from pathlib import Path


def _import_vavae(args: argparse.Namespace) -> None:
    from aligntok.models.vavae_import import import_vavae_checkpoint

    vae = import_vavae_checkpoint(args.checkpoint, args.out, latent_stats=args.latent_stats, scaling_factor=args.scaling_factor)
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    print(f"wrote {args.out}: AutoencoderKL, {vae.config.latent_channels} latent channels at stride {stride}, "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters")


def _export_pipeline(args: argparse.Namespace) -> None:
    from aligntok.models.t2i import INFO_FILE

    if (Path(args.dit) / INFO_FILE).is_file():  # a train-t2i model directory
        from aligntok.pipelines_t2i import AlignTokT2IPipeline as pipeline_class

        if args.shift is not None:
            raise ValueError("--shift is for class-to-image pipelines; a text-to-image pipeline takes timestep_shift "
                             "per call (default: FLUX's rule for the image size, as sample-t2i)")
        pipe = pipeline_class.from_aligntok(args.dit, args.tokenizer)
    else:
        from aligntok.pipelines import AlignTokClassPipeline as pipeline_class

        pipe = pipeline_class.from_aligntok(args.dit, args.tokenizer, timestep_shift=0.3 if args.shift is None else args.shift)
    pipe.save_pretrained(args.out)
    print(f"wrote {args.out}: {pipeline_class.__name__}.from_pretrained (or DiffusionPipeline.from_pretrained with "
          "trust_remote_code=True) loads it")


def _push_to_hub(args: argparse.Namespace) -> None:
    from aligntok.publish import push_to_hub

    url = push_to_hub(
        args.directory, args.repo_id, config=args.config, metrics=args.metrics, license=args.license,
        datasets=args.dataset or (), base_model=args.base_model, tags=args.tag or (), private=args.private or None,
    )
    print(f"pushed {args.directory} to {args.repo_id}: {url}")


def add_ecosystem_parsers(sub: argparse._SubParsersAction) -> None:
    """`aligntok import-vavae`, `export-pipeline` and `push-to-hub`."""
    p = sub.add_parser("push-to-hub", help="upload a tokenizer, LightningDiT or pipeline with a model card (config, metrics)")
    p.add_argument("directory", type=Path, help="a saved tokenizer (RUN/stage3), LightningDiT (RUN/model) or export-pipeline output")
    p.add_argument("repo_id", help="Hub model repository, ORG/NAME (created if missing; log in with `hf auth login`)")
    p.add_argument("--config", type=Path, help="training config YAML (default: config.yaml in the run folder, if any)")
    p.add_argument("--metrics", type=Path, nargs="+", help="aligntok evaluate JSON files (default: DIR.eval-*.json)")
    p.add_argument("--license", help="Hub license id (default apache-2.0; a wrapped diffusers VAE has its source's)")
    p.add_argument("--dataset", action="append", help="Hub dataset id trained on (repeatable; the first indexes the metrics)")
    p.add_argument("--base-model", help="hub id of the base model (default: the tokenizer's encoder or VAE)")
    p.add_argument("--tag", action="append", help="extra card tag (repeatable)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.set_defaults(func=_push_to_hub)

    p = sub.add_parser("export-pipeline", help="save a DiT or T2I model and its tokenizer as a diffusers pipeline directory")
    p.add_argument("--dit", "--model", dest="dit", required=True,
                   help="LightningDiT directory or hub id (class-to-image), or a train-t2i model directory (text-to-image)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained on (directory, hub id, VAE)")
    p.add_argument("--out", type=Path, required=True, help="output directory (diffusers pipeline layout)")
    p.add_argument("--shift", type=float, help="class-to-image: aligntok's timestep shift s (default 0.3; 0 or 1 = none)")
    p.set_defaults(func=_export_pipeline)

    p = sub.add_parser("import-vavae", help="convert a released VA-VAE (latent-diffusion) checkpoint into a tokenizer")
    p.add_argument("checkpoint", type=Path, help="torch or safetensors file (a state_dict in LDM names)")
    p.add_argument("--out", type=Path, required=True, help="output directory (diffusers AutoencoderKL format)")
    p.add_argument("--latent-stats", type=Path,
                   help="LightningDiT's latents_stats.pt (mean/std per channel) or an aligntok cache.json")
    p.add_argument("--scaling-factor", type=float, default=1.0, help="LightningDiT's latent_multiplier (VA-VAE: 1.0)")
    p.set_defaults(func=_import_vavae)
