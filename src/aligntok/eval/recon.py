"""Reconstruction metrics: PSNR, SSIM, LPIPS per image, and a streaming accumulator that adds rFID.

Protocol (as tokenizer papers report them, e.g. VA-VAE / LightningDiT's evaluation): every metric
is computed on uint8-quantised images, i.e. on the pixels a user would save. Both the original and
the reconstruction go through :func:`aligntok.eval.to_uint8`; a uint8 original stays exact.

* PSNR: 10 log10(255^2 / MSE) per image over all pixels and channels, capped at
  :data:`PSNR_MAX_DB` = 100 dB (equivalently, the MSE floored at 255^2 * 1e-10 = 6.5e-6), then
  averaged over images. Uncapped, one exact reconstruction (MSE 0) makes the dataset mean infinite and
  hides every other image. The cap also binds for near-exact images (one value off by one in a
  256 x 256 image is 101 dB) and lies far above any tokenizer's PSNR (20-35 dB); exact
  reconstructions are counted (``num_exact_images``).
* Inputs: uint8, or floats in [-1, 1]. Originals outside [-1, 1] and outputs that look like [0, 255]
  are refused, floats that look like [0, 1] warned about (:func:`aligntok.eval.images.check_pixel_scale`).
* SSIM: Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data
  range 255, averaged over the valid window positions (no padding, as in the authors' MATLAB code
  and scikit-image) and over channels, per image; computed in float64 by pytorch-msssim. Not
  torchmetrics: since its 1.5 release (PR #2721) it averages over reflect-padded borders too, so
  its SSIM depends on the installed version (VA-VAE's evaluation used torchmetrics).
* LPIPS: the ``lpips`` package (v0.1 linear heads) on a VGG-16 trunk by default (the LPIPS of the
  latent-diffusion / VA-VAE code; ``net="alex"`` is the package's own default). The trunk's
  ImageNet weights come from a file or torchvision's cache; ``pretrained_backbone=False`` uses a
  seeded random trunk for tests, whose numbers are not comparable with anything published.
* rFID: FID between Inception statistics of the originals and of the reconstructions
  (the ImageNet protocol: 50,000 validation images at 256 px).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aligntok.eval.features import FeatureNetwork, WeightsNotFoundError
from aligntok.eval.fid import FeatureStats, frechet_distance
from aligntok.eval.images import as_uint8, check_nchw_rgb, check_pixel_scale, from_uint8
from aligntok.eval.provenance import sha256_file

LPIPS_NETS = ("vgg", "alex")
#: Per-image PSNR cap in dB (see the module doc): exact reconstructions score this, not inf.
PSNR_MAX_DB = 100.0
SSIM_WINDOW = 11
_TORCHVISION_TRUNKS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
_RANDOM_TRUNK_SEED = 0


def _paired_uint8(originals: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_nchw_rgb(originals, "originals")
    check_nchw_rgb(reconstructions, "reconstructions")
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape"
        )
    check_pixel_scale(originals, "originals", reference=True)
    check_pixel_scale(reconstructions, "reconstructions", reference=False)
    return as_uint8(originals), as_uint8(reconstructions).to(originals.device)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error (float64, (B,)) of uint8 images, in squared uint8 levels."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)


def _psnr_of_mse(mse: torch.Tensor, max_db: float | None) -> torch.Tensor:
    value = 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 gives +inf
    return value if max_db is None else value.clamp(max=max_db)


def psnr(originals: torch.Tensor, reconstructions: torch.Tensor, *, max_db: float | None = PSNR_MAX_DB) -> torch.Tensor:
    """Per-image PSNR in dB (float64, shape (B,)) on uint8-quantised images, capped at ``max_db``.

    Inputs: (B, 3, H, W) uint8, or float in [-1, 1] (quantised with :func:`to_uint8`); wrong-scale
    floats are refused or warned about (see the module doc). Identical images score ``max_db``
    (default :data:`PSNR_MAX_DB`), or inf with ``max_db=None``.
    """
    a, b = _paired_uint8(originals, reconstructions)
    return _psnr_of_mse(_mse(a, b), max_db)


def ssim(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (float64, shape (B,)) on uint8-quantised images; 1 where identical."""
    from pytorch_msssim import ssim as gaussian_ssim

    a, b = _paired_uint8(originals, reconstructions)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(a.shape[-2:])}")
    return gaussian_ssim(
        a.double(),
        b.double(),
        data_range=255.0,
        size_average=False,
        win_size=SSIM_WINDOW,
        win_sigma=1.5,
        K=(0.01, 0.03),
    )


def lpips_trunk_cache_path(net: str) -> Path:
    """Where torchvision keeps the ImageNet weights of the LPIPS trunk ``net``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_TRUNKS[net].rsplit("/", 1)[1]


def resolve_lpips_trunk(net: str, weights: str | os.PathLike | None = None, *, allow_download: bool = True) -> Path:
    """The torchvision ImageNet weights file of the LPIPS trunk: ``weights``, else torchvision's cache."""
    url = _TORCHVISION_TRUNKS[net]
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"LPIPS trunk weights file {path} does not exist; get it from {url}")
        return path
    cached = lpips_trunk_cache_path(net)
    if cached.is_file():
        return cached
    hint = f"LPIPS {net} trunk weights not found at {cached}; download {url} to that path or pass the file explicitly"
    if not allow_download:
        raise WeightsNotFoundError(hint)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except (OSError, RuntimeError) as e:
        raise WeightsNotFoundError(f"{hint} (download failed: {type(e).__name__})") from None
    return cached


class LPIPSMetric(nn.Module):
    """LPIPS distance per image pair (lpips package, v0.1 linear heads) on uint8-quantised images.

    ``pretrained_backbone``: load the trunk's ImageNet weights (from ``backbone_weights`` or
    torchvision's cache; a one-line error when missing offline). False builds a random trunk
    seeded with 0, usable for tests only.
    """

    def __init__(
        self,
        net: str = "vgg",
        *,
        pretrained_backbone: bool = True,
        backbone_weights: str | os.PathLike | None = None,
        allow_download: bool = True,
    ):
        super().__init__()
        import lpips

        if net not in LPIPS_NETS:
            raise ValueError(f"LPIPS net={net!r} is not one of {', '.join(LPIPS_NETS)}")
        if backbone_weights is not None and not pretrained_backbone:
            raise ValueError("backbone_weights was given but pretrained_backbone=False")
        trunk_file = (
            resolve_lpips_trunk(net, backbone_weights, allow_download=allow_download) if pretrained_backbone else None
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(_RANDOM_TRUNK_SEED)  # a random trunk is at least the same random trunk every run
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation notes on `pretrained=`
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if trunk_file is not None:
            self._load_trunk(trunk_file)
        self.model.eval().requires_grad_(False)
        self.net = net
        self.trunk_weights = str(trunk_file) if trunk_file is not None else None
        self.trunk_sha256 = sha256_file(trunk_file) if trunk_file is not None else None
        self.head_sha256 = sha256_file(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth")

    def _load_trunk(self, path: Path) -> None:
        """Load a torchvision ``features.N.*`` state dict into lpips' ``sliceK.N.*`` trunk."""
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            source = load_file(path)
        else:
            source = torch.load(path, map_location="cpu", weights_only=True)
        trunk = self.model.net
        wanted = {}
        for key in trunk.state_dict():
            _, index, param = key.split(".", 2)  # "slice2.5.weight" -> "features.5.weight"
            source_key = f"features.{index}.{param}"
            if source_key not in source:
                expected = f"torchvision's {self.model.pnet_type} features"
                raise ValueError(f"{path}: no '{source_key}' in the LPIPS trunk weights; expected {expected}")
            wanted[key] = source[source_key]
        try:
            trunk.load_state_dict(wanted)
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit the LPIPS trunk ({str(e).splitlines()[0]})") from None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def forward(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS (float32, shape (B,))."""
        a, b = _paired_uint8(originals, reconstructions)
        device = self.device
        return self.model(from_uint8(a).to(device), from_uint8(b).to(device)).flatten()

    def describe(self) -> dict[str, Any]:
        return {
            "name": f"lpips-{self.net}-v0.1",
            "weights": self.trunk_weights,
            "weights_sha256": self.trunk_sha256,
            "head_sha256": self.head_sha256,
            "pretrained_backbone": self.trunk_weights is not None,
        }


class ReconMetrics:
    """Streaming PSNR / SSIM / LPIPS means and rFID over (original, reconstruction) batches.

    ``update`` takes (B, 3, H, W) tensors (float in [-1, 1] or uint8); ``compute`` returns the
    means over all images seen, combined across torch.distributed ranks when one is initialised.
    LPIPS and rFID are skipped (None) when their network is not given.
    """

    def __init__(self, *, lpips: LPIPSMetric | None = None, inception: FeatureNetwork | None = None):
        self.lpips = lpips
        self.inception = inception
        self.count = 0
        self._sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0, "exact": 0.0}
        self.original_stats = FeatureStats()
        self.reconstruction_stats = FeatureStats()

    @torch.inference_mode()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        a, b = _paired_uint8(originals, reconstructions)
        mse = _mse(a, b)
        self._sums["psnr"] += _psnr_of_mse(mse, PSNR_MAX_DB).sum().item()
        self._sums["exact"] += (mse == 0).sum().item()
        self._sums["ssim"] += ssim(a, b).sum().item()
        if self.lpips is not None:
            self._sums["lpips"] += self.lpips(a, b).double().sum().item()
        if self.inception is not None:
            device = self.inception.device
            self.original_stats.update(self.inception(a.to(device))["pool"])
            self.reconstruction_stats.update(self.inception(b.to(device))["pool"])
        self.count += a.shape[0]

    def _across_ranks(self) -> tuple[int, dict[str, float], FeatureStats, FeatureStats]:
        import torch.distributed as dist

        from aligntok.training.distributed import all_reduce_sum, is_distributed

        if not is_distributed():
            return self.count, dict(self._sums), self.original_stats, self.reconstruction_stats
        on_gpu = dist.get_backend() == "nccl"  # NCCL only reduces CUDA tensors
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        packed = all_reduce_sum(
            torch.tensor([float(self.count), *self._sums.values()], dtype=torch.float64, device=device)
        )
        originals, reconstructions = self.original_stats, self.reconstruction_stats
        if self.inception is not None:
            originals, reconstructions = originals.across_ranks(), reconstructions.across_ranks()
        return (
            int(packed[0].item()),
            dict(zip(self._sums, packed[1:].tolist(), strict=True)),
            originals,
            reconstructions,
        )

    def compute(self) -> dict[str, Any]:
        """{'psnr', 'ssim', 'lpips', 'rfid', 'num_images', 'num_exact_images'} over all ranks (call on every
        rank under torchrun). ``psnr`` is the mean of per-image PSNRs capped at :data:`PSNR_MAX_DB`;
        ``num_exact_images`` counts the uint8-identical reconstructions (each scored at the cap)."""
        count, sums, originals, reconstructions = self._across_ranks()
        if count == 0:
            raise ValueError("ReconMetrics.compute: no images were added")
        result: dict[str, Any] = {
            "psnr": sums["psnr"] / count,
            "ssim": sums["ssim"] / count,
            "lpips": sums["lpips"] / count if self.lpips is not None else None,
            "rfid": None,
            "num_images": count,
            "num_exact_images": round(sums["exact"]),
        }
        if self.inception is not None:
            result["rfid"] = frechet_distance(originals.mean, originals.cov, reconstructions.mean, reconstructions.cov)
        return result

    def networks(self) -> list[dict[str, Any]]:
        """Provenance entries of the networks in use."""
        return [net.describe() for net in (self.inception, self.lpips) if net is not None]
