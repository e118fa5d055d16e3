"""The library side of ``aligntok evaluate recon|gen|probe``: datasets in, JSON-ready results out.

* :func:`evaluate_reconstruction` streams a data spec through a tokenizer and measures PSNR, SSIM,
  LPIPS and rFID with :class:`aligntok.eval.ReconMetrics`. The references are exactly the tokenizer's
  inputs (the data layer's ADM center crop at ``resolution``), and every metric sees both sides
  through the one uint8 conversion. Under torchrun each rank reads a disjoint slice of the selected
  images (no padding, no duplicates) and the metrics are combined across ranks.
* :func:`evaluate_tokenizer_probe` pools the tokenizer's latents for a linear probe and compares
  them by CKNNA with the features of one fixed, pretrained reference encoder (DINOv2-L/14 by default),
  the same for every tokenizer, as the paper measures AlignTok and its baselines.
* ``aligntok evaluate gen`` calls :func:`aligntok.eval.evaluate_generation` directly.

Which images are evaluated, and each rank's share: :mod:`aligntok.eval.selection`. The JSON file and the
summary every command prints: :mod:`aligntok.eval.results`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from aligntok.data import ShardDataset, build_dataset
from aligntok.eval.features import FeatureNetwork, load_inception
from aligntok.eval.probe import average_pool, cknna, evaluate_probe
from aligntok.eval.provenance import build_provenance, sha256_file
from aligntok.eval.recon import LPIPS_NETS, PSNR_MAX_DB, LPIPSMetric, ReconMetrics
from aligntok.eval.selection import (
    KEY_FIELD,
    MAX_LISTED_SKIPPED,
    ImageSelection,
    check_every_rank_has_images,
    gather_skipped,
    readable_mask,
    select_images,
    selection_loader,
)
from aligntok.models.tokenizer import WEIGHTS_NAME, AlignTokTokenizer
from aligntok.progress import progress_bar
from aligntok.training.distributed import (
    DistInfo,
    broadcast_object,
    gather_objects,
    init_distributed,
)

log = logging.getLogger(__name__)

#: The ImageNet reconstruction protocol: 50,000 validation images at 256 px.
IMAGENET_RECON_IMAGES = 50_000
IMAGENET_RECON_RESOLUTION = 256


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


#: A tokenizer argument: a saved directory, a Hub id, or a loaded model (encode/decode/stride/latent_channels).
TokenizerSource = str | os.PathLike | nn.Module


def _load_tokenizer(tokenizer: TokenizerSource, device: torch.device) -> nn.Module:
    # from_pretrained reads config.json's method, so the baselines' tokenizers load here too.
    model = tokenizer if isinstance(tokenizer, nn.Module) else AlignTokTokenizer.from_pretrained(tokenizer)
    return model.to(device).eval()


def describe_tokenizer(tokenizer: TokenizerSource, model: nn.Module) -> dict[str, Any]:
    """Provenance entry of a tokenizer: where it came from, its shape, and its weights' sha256."""
    info: dict[str, Any] = {
        "name": f"{getattr(model, 'method', 'aligntok')}-tokenizer",
        "trained_with": getattr(model.config, "trained_with", getattr(model, "method", None)),
        "source": None if isinstance(tokenizer, nn.Module) else str(tokenizer),
        "encoder": getattr(model.config, "encoder", None),
        "latent_channels": model.latent_channels,
        "stride": model.stride,
        "weights": None,
        "weights_sha256": None,
    }
    # aligntok's weights file, or a diffusers AutoencoderKL directory's.
    for name in (WEIGHTS_NAME, "diffusion_pytorch_model.safetensors"):
        if not isinstance(tokenizer, nn.Module) and (Path(tokenizer) / name).is_file():
            weights = Path(tokenizer) / name
            info["weights"], info["weights_sha256"] = str(weights), sha256_file(weights)
            break
    return info


def _check_resolution(resolution: int, model: nn.Module) -> None:
    if resolution <= 0 or resolution % model.stride:
        raise ValueError(f"--resolution {resolution} is not a positive multiple of the tokenizer's stride {model.stride}")


def _device(dist: DistInfo, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else dist.device


# ---------------------------------------------------------------------------------------------
# evaluate recon
# ---------------------------------------------------------------------------------------------


def evaluate_reconstruction(
    tokenizer: TokenizerSource,
    data: str,
    *,
    resolution: int = IMAGENET_RECON_RESOLUTION,
    num: int | None = None,
    batch_size: int = 32,
    num_workers: int = 4,
    seed: int = 0,
    lpips_net: str | None = "vgg",
    lpips_backbone_weights: str | os.PathLike | None = None,
    lpips_pretrained_backbone: bool = True,
    rfid: bool = True,
    inception: FeatureNetwork | None = None,
    inception_weights: str | os.PathLike | None = None,
    allow_download: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """PSNR, SSIM, LPIPS and rFID of ``tokenizer`` over the images of the data spec ``data``.

    ``num``: images to evaluate (all when None; a seeded random subset of ``seed`` otherwise; for
    ``builtin:`` data, the dataset's size). ``lpips_net``: "vgg" (the protocol's), "alex" or None (no
    LPIPS); its trunk weights come from ``lpips_backbone_weights`` or torchvision's cache, or are a
    seeded random trunk with ``lpips_pretrained_backbone=False`` (tests and demos only). ``rfid``:
    Inception statistics of originals and reconstructions from ``inception`` or the weights file /
    torch-fidelity's cache. Call on every rank under torchrun; every rank returns the same result.
    """
    dist = init_distributed()
    device = _device(dist, device)
    if lpips_net is not None and lpips_net not in LPIPS_NETS:
        raise ValueError(f"--lpips {lpips_net!r} is not one of {', '.join(LPIPS_NETS)}, none")
    dataset = build_dataset(data, resolution, builtin_size=num or 10_000)
    selection = select_images(dataset, num, rank=dist.rank, world_size=dist.world_size, seed=seed,
                              num_workers=num_workers)
    if rfid:
        check_every_rank_has_images(selection, data)  # rFID statistics are combined from every rank
    # Feature networks first: a missing weights file should fail before any image is read.
    lpips = None
    if lpips_net is not None:
        lpips = LPIPSMetric(lpips_net, pretrained_backbone=lpips_pretrained_backbone,
                            backbone_weights=lpips_backbone_weights, allow_download=allow_download).to(device)
    if rfid and inception is None:
        inception = load_inception(inception_weights, allow_download=allow_download)
    inception = inception.to(device) if rfid and inception is not None else None
    model = _load_tokenizer(tokenizer, device)
    _check_resolution(resolution, model)

    metrics = ReconMetrics(lpips=lpips, inception=inception)
    skipped: list[str] = []
    bar = progress_bar(total=selection.per_rank[dist.rank], disable=not (progress and dist.is_main), desc="recon",
                       unit="img")
    with bar, torch.inference_mode():
        for batch in selection_loader(selection, batch_size, num_workers):
            good, bad = readable_mask(batch)
            skipped += bad
            if good.any():
                x = batch["image"][good].to(device, non_blocking=True)
                metrics.update(x, model.decode(model.encode(x)))
            bar.update(len(good))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = metrics.compute()
    skipped = gather_skipped(skipped)
    for message in skipped[:MAX_LISTED_SKIPPED]:
        log.warning("skipped unreadable image %s", message)

    notes = []
    if rfid and (result["num_images"] != IMAGENET_RECON_IMAGES or resolution != IMAGENET_RECON_RESOLUTION):
        notes.append(
            f"{result['num_images']} images at {resolution} px: rFID depends on both; published ImageNet numbers "
            f"use {IMAGENET_RECON_IMAGES:,} validation images at {IMAGENET_RECON_RESOLUTION} px"
        )
    if lpips is not None and not lpips.describe()["pretrained_backbone"]:
        notes.append("LPIPS used a random trunk: comparable only with runs of the same random trunk")
    result.update(
        num_skipped=len(skipped),
        skipped=skipped[:MAX_LISTED_SKIPPED],
        notes=notes,
        warnings=sorted({str(w.message) for w in caught}),
    )
    result["provenance"] = build_provenance(
        num_samples=result["num_images"],
        reference={
            "data": data,
            "resolution": resolution,
            "crop": "ADM center crop (box-filter halving, bicubic resize of the short side, center crop)",
            "images_in_dataset": selection.available,
            "images_selected": selection.num_selected,
            "selection": selection.order,
            "num_skipped": len(skipped),
        },
        feature_networks=[describe_tokenizer(tokenizer, model), *metrics.networks()],
        settings={
            "protocol": "references are the tokenizer's inputs; both sides quantised to uint8 (round, clamp) "
            "before every metric",
            "psnr": f"per image over all pixels and channels (data range 255), capped at {PSNR_MAX_DB:g} dB "
            "(MSE floored at 255^2 * 10^(-cap/10)), averaged over images; num_exact_images counts MSE 0",
            "ssim": "Gaussian 11x11 window, sigma 1.5, K=(0.01, 0.03), no padding, per image, averaged",
            "lpips": f"lpips v0.1, {lpips_net} trunk" if lpips_net is not None else None,
            "rfid": "Inception pool_3 (2048-d) of originals vs reconstructions" if rfid else None,
            "batch_size": batch_size,
            "world_size": dist.world_size,
            "seed": seed,
        },
        device=device,
    )
    return result


# ---------------------------------------------------------------------------------------------
# evaluate probe
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _PooledFeatures:
    """Spatially pooled features of the images of a selection, ordered by selection key."""

    keys: torch.Tensor  #: (N,) selection keys
    latents: torch.Tensor  #: (N, C) pooled latents
    labels: torch.Tensor  #: (N,) class labels
    encoder_keys: torch.Tensor  #: (M,) keys of the images whose reference-encoder features were kept
    encoder: torch.Tensor  #: (M, hidden) pooled features of the CKNNA reference encoder
    skipped: list[str]  #: unreadable images, all ranks


def _pooled_features(
    model: nn.Module,
    selection: ImageSelection,
    *,
    reference: nn.Module | None,
    encoder_keys: set[int],
    dist: DistInfo,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
) -> _PooledFeatures | None:
    """Pool the latents (and, for ``encoder_keys``, the reference encoder's features on the latent's grid)
    on every rank; gather on rank 0."""
    keys, latents, labels, enc_keys, enc_features, skipped = [], [], [], [], [], []
    bar = progress_bar(total=selection.per_rank[dist.rank], disable=not (progress and dist.is_main), desc=desc,
                       unit="img")
    with bar, torch.inference_mode():
        for batch in selection_loader(selection, batch_size, num_workers):
            good, bad = readable_mask(batch)
            skipped += bad
            bar.update(len(good))
            if not good.any():
                continue
            x = batch["image"][good].to(device, non_blocking=True)
            latent = model.encode(x)
            batch_keys = batch[KEY_FIELD][good]
            keys.append(batch_keys)
            latents.append(average_pool(latent).float().cpu())
            labels.append(batch["label"][good])
            wanted = torch.tensor([int(k) in encoder_keys for k in batch_keys], dtype=torch.bool)
            if reference is not None and wanted.any():
                features = reference(x[wanted.to(x.device)], tuple(latent.shape[-2:]))
                enc_keys.append(batch_keys[wanted])
                enc_features.append(average_pool(features).float().cpu())
    local = (keys, latents, labels, enc_keys, enc_features, skipped)
    parts = gather_objects(local)
    if parts is None:
        return None

    def joined(index: int, empty: torch.Tensor) -> torch.Tensor:
        pieces = [piece for part in parts for piece in part[index]]
        return torch.cat(pieces) if pieces else empty

    all_keys = joined(0, torch.zeros(0, dtype=torch.long))
    order = torch.argsort(all_keys)
    all_enc_keys = joined(3, torch.zeros(0, dtype=torch.long))
    enc_order = torch.argsort(all_enc_keys)
    return _PooledFeatures(
        keys=all_keys[order],
        latents=joined(1, torch.zeros(0, model.latent_channels))[order],
        labels=joined(2, torch.zeros(0, dtype=torch.long))[order],
        encoder_keys=all_enc_keys[enc_order],
        encoder=joined(4, torch.zeros(0, 0))[enc_order],
        skipped=[message for part in parts for message in part[5]],
    )


def _cknna_reference(
    spec: str | None, stride: int, device: torch.device
) -> tuple[nn.Module | None, str | None, str | None]:
    """(encoder, its name, why there is none): the fixed reference encoder CKNNA measures tokenizers against."""
    from aligntok.eval.features import (
        DINOV2_DEFAULT,
        WeightsNotFoundError,
        resolve_hf_weights,
    )
    from aligntok.models.encoders import load_encoder

    if spec is None or spec == "none":
        return None, None, "no reference encoder was requested (--cknna-encoder none)"
    name = str(spec)
    if name == "auto":
        try:
            name = str(resolve_hf_weights(DINOV2_DEFAULT, allow_download=False))
        except WeightsNotFoundError:
            return None, None, (
                f"the default reference encoder {DINOV2_DEFAULT} is not in the local Hugging Face cache; "
                "pass --cknna-encoder (a hub id, directory or standin:NAME)"
            )
    if name.startswith("standin:"):  # an offline stand-in DINOv2 (shipped, or trained once and cached)
        from aligntok.standins.encoder import resolve_encoder_spec

        name = resolve_encoder_spec(name)
    encoder = load_encoder(name, stride=stride).to(device).eval().requires_grad_(False)
    return encoder, (DINOV2_DEFAULT if spec == "auto" else str(spec)), None


_NEEDS_LABELS = "a linear probe needs labelled data (class subfolders, or 'cls' entries in shards)"


def _check_has_classes(dataset: Dataset, source: str) -> None:
    """Fail before reading any image when a dataset says it has no classes (shards may not know)."""
    if not isinstance(dataset, ShardDataset) and getattr(dataset, "num_classes", None) == 0:
        raise ValueError(f"{source}: images without class labels; {_NEEDS_LABELS}")


def _check_labels(features: _PooledFeatures, source: str) -> None:
    if len(features.labels) == 0:
        raise ValueError(f"{source}: no readable images to probe")
    if (features.labels < 0).any():
        raise ValueError(f"{source}: images without class labels; {_NEEDS_LABELS}")


def evaluate_tokenizer_probe(
    tokenizer: TokenizerSource,
    data: str,
    *,
    test_data: str | None = None,
    resolution: int = 256,
    num: int | None = None,
    test_num: int | None = None,
    batch_size: int = 64,
    num_workers: int = 4,
    seed: int = 0,
    test_fraction: float = 0.2,
    weight_decay: float = 1e-4,
    cknna_k: int = 10,
    cknna_samples: int = 10_000,
    cknna_encoder: str | None = "auto",
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Linear-probe accuracy on average-pooled latents, and CKNNA(latents, reference encoder features).

    The probe trains on ``data`` and tests on ``test_data`` (for ``builtin:`` data drawn with another
    seed, so it is held out) or, without it, on a seeded ``test_fraction`` split of ``data``. CKNNA
    uses a seeded random subset of at most ``cknna_samples`` images of ``data`` and compares the pooled
    latents with the pooled patch features (on the latent's grid) of ``cknna_encoder``, a pretrained
    encoder that is the same for every tokenizer, never the tokenizer's own fine-tuned one:
    "auto" (DINOv2-L/14 if it is in the local Hugging Face cache, else CKNNA is skipped with a note), a
    Hub id, a local directory or ``standin:NAME``, or None (skipped). Call on every rank under torchrun;
    the probe runs on rank 0 and every rank returns its result.
    """
    dist = init_distributed()
    device = _device(dist, device)
    if cknna_samples < 4:
        raise ValueError(f"--cknna-samples must be at least 4, got {cknna_samples}")
    train_set = build_dataset(data, resolution, builtin_size=num or 10_000, seed=seed)
    _check_has_classes(train_set, data)
    selection = select_images(train_set, num, rank=dist.rank, world_size=dist.world_size, seed=seed,
                              num_workers=num_workers)
    test_selection = None
    if test_data is not None:
        test_set = build_dataset(test_data, resolution, builtin_size=test_num or 10_000, seed=seed + 1)
        _check_has_classes(test_set, test_data)
        test_selection = select_images(test_set, test_num, rank=dist.rank, world_size=dist.world_size, seed=seed,
                                       num_workers=num_workers)
    model = _load_tokenizer(tokenizer, device)
    _check_resolution(resolution, model)
    reference, reference_name, reference_missing = _cknna_reference(cknna_encoder, model.stride, device)

    subset_order = torch.randperm(selection.num_selected, generator=torch.Generator().manual_seed(seed))
    cknna_keys = {selection.keys[i] for i in subset_order[:cknna_samples].tolist()}
    options = {"dist": dist, "device": device, "batch_size": batch_size, "num_workers": num_workers,
               "progress": progress}
    train = _pooled_features(model, selection, reference=reference, encoder_keys=cknna_keys, desc="probe (train)",
                             **options)
    test = None
    if test_selection is not None:
        test = _pooled_features(model, test_selection, reference=None, encoder_keys=set(), desc="probe (test)",
                                **options)

    # The probe runs on rank 0; its result or its error reaches every rank, so none waits forever.
    outcome: dict[str, Any] = {}
    if dist.is_main:
        try:
            outcome["result"] = _probe_on_main(
                model, tokenizer, data, test_data, selection, test_selection, train, test,
                resolution=resolution, seed=seed, test_fraction=test_fraction, weight_decay=weight_decay,
                cknna_k=cknna_k, cknna_encoder=reference_name, cknna_missing=reference_missing, device=device,
            )
        except ValueError as e:
            outcome["error"] = str(e)
    outcome = broadcast_object(outcome)
    if "error" in outcome:
        raise ValueError(outcome["error"])
    return outcome["result"]


def _probe_on_main(
    model: nn.Module,
    tokenizer: TokenizerSource,
    data: str,
    test_data: str | None,
    selection: ImageSelection,
    test_selection: ImageSelection | None,
    train: _PooledFeatures,
    test: _PooledFeatures | None,
    *,
    resolution: int,
    seed: int,
    test_fraction: float,
    weight_decay: float,
    cknna_k: int,
    cknna_encoder: str | None,
    cknna_missing: str | None,
    device: torch.device,
) -> dict[str, Any]:
    _check_labels(train, data)
    if test is not None:
        _check_labels(test, str(test_data))
    result = evaluate_probe(
        train.latents,
        train.labels,
        test_latents=test.latents if test is not None else None,
        test_labels=test.labels if test is not None else None,
        test_fraction=test_fraction,
        seed=seed,
        weight_decay=weight_decay,
        tokenizer=describe_tokenizer(tokenizer, model),
        dataset={
            "data": data,
            "test_data": test_data,
            "resolution": resolution,
            "crop": "ADM center crop",
            "images_in_dataset": selection.available,
            "selection": selection.order,
            "test_selection": test_selection.order if test_selection is not None else None,
        },
        device=device,
    )
    # CKNNA on its own subset (evaluate_probe would need every image's encoder features in memory).
    encoder_rows = torch.searchsorted(train.keys, train.encoder_keys)
    cknna_value, cknna_note = None, None
    if cknna_missing is not None:
        cknna_note = f"not computed: {cknna_missing}"
    elif len(train.encoder_keys) < max(4, cknna_k + 2):
        cknna_note = f"not computed: needs at least k+2={cknna_k + 2} images"
    else:
        cknna_value = cknna(train.latents[encoder_rows], train.encoder, k=cknna_k, device=device)
    result["cknna"] = cknna_value
    skipped = train.skipped + (test.skipped if test is not None else [])
    result.update(
        num_images=len(train.latents),
        num_test_images=len(test.latents) if test is not None else None,
        num_skipped=len(skipped),
        skipped=skipped[:MAX_LISTED_SKIPPED],
    )
    result["provenance"]["settings"].update(
        latents="tokenizer latents (after the adapter), spatial mean",
        cknna_between="pooled latents vs the pooled patch features, on the latent's grid, of one fixed "
        "pretrained reference encoder (the same for every tokenizer)",
        cknna_encoder=cknna_encoder,
        cknna_k=cknna_k,
        cknna_samples=len(train.encoder_keys),
        cknna_kernel="inner product of L2-normalised pooled features",
    )
    if cknna_note is not None:
        result["notes"] = [f"cknna {cknna_note}"]
    return result
