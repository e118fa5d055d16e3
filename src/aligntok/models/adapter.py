"""The adapter: a two-layer MLP applied to every token, mapping encoder features to the latent channels."""

from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """Per-token MLP ``in_dim -> hidden_dim -> out_dim`` on feature grids (B, C, h, w).

    The paper gives only "two-layer MLP"; the GELU between the layers is our choice (inferred).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        if min(in_dim, hidden_dim, out_dim) <= 0:
            raise ValueError(f"adapter sizes must be positive, got {in_dim} -> {hidden_dim} -> {out_dim}")
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4 or features.shape[1] != self.in_dim:
            raise ValueError(f"adapter expects (B, {self.in_dim}, h, w) features, got {tuple(features.shape)}")
        # Channels last so that nn.Linear acts on each token's feature vector.
        return self.net(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
