"""Reading a latent cache (the format :func:`aligntok.data.latents.cache_latents` writes) and the
per-channel statistics both sides combine.

:class:`LatentDataset` reads a finished cache as a map-style dataset of sample dicts
``{"latent", "latent_flip", "label", "index"}``, so :func:`aligntok.data.build_loader` streams it with
exact resume. :class:`ChannelMoments` holds float64 per-channel moments that merge exactly across shards
(Chan et al.'s parallel update).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from aligntok.io import read_json_document

FORMAT_NAME = "aligntok-latent-cache"
CACHE_FILE = "cache.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"


# ---------------------------------------------------------------------------------------------
# Per-channel statistics
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChannelMoments:
    """Count, mean and sum of squared deviations per channel, in float64; merge exactly across parts."""

    count: int
    mean: torch.Tensor  #: (C,) float64
    m2: torch.Tensor  #: (C,) float64, sum of squared deviations from ``mean``

    @classmethod
    def empty(cls, channels: int) -> ChannelMoments:
        zeros = torch.zeros(channels, dtype=torch.float64)
        return cls(0, zeros, zeros.clone())

    @classmethod
    def of(cls, latents: torch.Tensor) -> ChannelMoments:
        """Moments of latents (N, C, h, w) over N, h and w."""
        z = latents.detach().to(torch.float64).transpose(0, 1).reshape(latents.shape[1], -1)
        if z.shape[1] == 0:
            return cls.empty(latents.shape[1])
        mean = z.mean(dim=1)
        return cls(z.shape[1], mean, (z - mean[:, None]).square().sum(dim=1))

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """The moments of the union (Chan, Golub and LeVeque's pairwise update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / total)
        return ChannelMoments(total, mean, m2)

    @property
    def std(self) -> torch.Tensor:
        """Unbiased standard deviation per channel (as ``torch.std``)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 latent values per channel for a std, got {self.count}")
        return (self.m2 / (self.count - 1)).sqrt()


# ---------------------------------------------------------------------------------------------
# Reading the cache
# ---------------------------------------------------------------------------------------------


def read_cache_metadata(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The cache.json of a finished latent cache, or a one-line error saying what is wrong."""
    path = Path(cache_dir) / CACHE_FILE
    if not Path(cache_dir).is_dir():
        raise FileNotFoundError(f"latent cache {cache_dir} does not exist; make it with aligntok cache-latents")
    if not path.is_file():
        raise FileNotFoundError(
            f"{cache_dir} is not a finished latent cache (no {CACHE_FILE}); re-run aligntok cache-latents to complete it"
        )
    return read_json_document(path, FORMAT_NAME, "an aligntok latent cache")


class LatentDataset(Dataset):
    """A finished latent cache as a map-style dataset of ``{"latent", "latent_flip", "label", "index"}``
    (plus ``caption`` and ``caption_flip`` for a cache made with ``captions``).

    Items are read lazily from the safetensors shards (each process opens them on first use), so the
    dataset is cheap to send to DataLoader workers whatever the cache's size.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.directory = Path(cache_dir)
        self.metadata = read_cache_metadata(cache_dir)
        self.files = [self.directory / s["file"] for s in self.metadata["shards"]]
        for path in self.files:
            if not path.is_file():
                raise FileNotFoundError(f"latent cache {cache_dir} lacks its shard {path.name}")
        self.offsets = [0]
        for shard in self.metadata["shards"]:
            self.offsets.append(self.offsets[-1] + int(shard["images"]))
        self.latent_shape: tuple[int, ...] = tuple(self.metadata["latent_shape"])
        self.num_classes = int(self.metadata["num_classes"])
        self.latent_mean = torch.tensor(self.metadata["latent_mean"], dtype=torch.float32)
        self.latent_std = torch.tensor(self.metadata["latent_std"], dtype=torch.float32)
        self.has_captions = bool(self.metadata.get("captions"))
        self._open: dict[int, Any] = {}
        self._captions: dict[int, list[list[str]]] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}, "_captions": {}}  # open file handles stay in the process that opened them

    def _shard(self, number: int) -> Any:
        if number not in self._open:
            self._open[number] = safe_open(str(self.files[number]), framework="pt")
        return self._open[number]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent cache of {len(self)} images")
        index %= len(self)
        number = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[number]
        shard = self._shard(number)
        texts = {}
        if self.has_captions:
            if number not in self._captions:
                self._captions[number] = json.loads(shard.metadata()["captions"])
            texts = dict(zip(("caption", "caption_flip"), self._captions[number][row], strict=True))
        return {
            **texts,
            "latent": shard.get_slice("latents")[row : row + 1][0],
            "latent_flip": shard.get_slice("latents_flip")[row : row + 1][0],
            "label": int(shard.get_slice("labels")[row : row + 1][0]),
            "index": int(shard.get_slice("indices")[row : row + 1][0]),
        }
