"""Semantic preservation loss of stage 2: keep the fine-tuned latent close to the stage-1 latent.

A frozen copy of the stage-1 encoder and adapter is taken at construction. Each call compares the
current features of a batch, after the adapter (the paper's choice, on the 32-d latent) or before it,
with the frozen copy's features of the same images, by MSE or by cosine distance.

The copy is deliberately held outside the module tree (this class is not an ``nn.Module``): it never
appears in a tokenizer's or trainer's ``state_dict``, so checkpoints do not carry a frozen teacher, and
DDP/FSDP never see it. Rebuild it from the stage-1 tokenizer when resuming.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.config import ConfigError, check_choice


@dataclasses.dataclass
class SemanticLossConfig:
    """Weight and form of the semantic preservation loss."""

    weight: float = 1.0  #: w_sp (paper: 1 on ImageNet, 3 on LAION; 0 lets the latent drift freely)
    kind: str = "mse"  #: mse | cosine (1 - cosine similarity per token, averaged)
    where: str = "post"  #: post (latent after the adapter; the paper's choice) | pre (encoder features)

    def validate(self) -> None:
        check_choice("kind", self.kind, ("mse", "cosine"))
        check_choice("where", self.where, ("post", "pre"))
        if self.weight < 0:
            raise ConfigError(f"weight={self.weight} must be >= 0")


class SemanticPreservationLoss:
    """Distance between current features and those of a frozen copy of the stage-1 encoder + adapter.

    Pass the plain (unwrapped) modules, before DDP/FSDP wrapping; they are deep-copied, frozen and put in
    eval mode. Move the copy with :meth:`to`.
    """

    def __init__(self, cfg: SemanticLossConfig | None = None, *, encoder: nn.Module, adapter: nn.Module) -> None:
        cfg = cfg or SemanticLossConfig()
        cfg.validate()
        self.config = cfg
        self.frozen_encoder = copy.deepcopy(encoder).requires_grad_(False).eval()
        self.frozen_adapter = copy.deepcopy(adapter).requires_grad_(False).eval()

    def to(self, *args, **kwargs) -> SemanticPreservationLoss:
        """Move the frozen copy (same arguments as ``nn.Module.to``)."""
        self.frozen_encoder.to(*args, **kwargs)
        self.frozen_adapter.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen stage-1 features of ``x`` at the configured place (pre- or post-adapter)."""
        features = self.frozen_encoder(x)
        return self.frozen_adapter(features) if self.config.where == "post" else features

    def __call__(
        self, x: torch.Tensor, pre: torch.Tensor | None, post: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``weight * distance(current, frozen)``; ``pre``/``post`` come from ``tokenizer.features(x)``."""
        current = post if self.config.where == "post" else pre
        if current is None:
            raise ValueError(
                f"semantic loss with where={self.config.where!r} needs the {self.config.where}-adapter features"
            )
        target = self.reference(x)
        if current.shape != target.shape:
            raise ValueError(
                f"current features {tuple(current.shape)} and frozen ones {tuple(target.shape)} differ in shape"
            )
        with torch.autocast(device_type=current.device.type, enabled=False):
            current, target = current.float(), target.float()
            if self.config.kind == "mse":
                distance = F.mse_loss(current, target)
            else:  # channels are dim 1: one cosine per token
                distance = (1.0 - F.cosine_similarity(current, target, dim=1)).mean()
            total = self.config.weight * distance
        return total, {f"sp_{self.config.kind}": distance.detach(), "sp_total": total.detach()}
