"""Projector: maps vision features into the language model's embedding space."""

from __future__ import annotations

import torch
from torch import nn


def build_projector(kind: str, vision_dim: int, text_dim: int) -> nn.Sequential:
    """`mlp_ln`: Linear -> ReLU -> LayerNorm -> Linear (the seed design); `mlp_gelu`: LLaVA-1.5's MLP."""
    if kind == "mlp_ln":
        return nn.Sequential(
            nn.Linear(vision_dim, text_dim), nn.ReLU(), nn.LayerNorm(text_dim), nn.Linear(text_dim, text_dim)
        )
    if kind == "mlp_gelu":
        return nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
    raise ValueError(f"unknown projector type {kind!r}; choose 'mlp_ln' or 'mlp_gelu'")


@torch.no_grad()
def match_embedding_scale(projector: nn.Sequential, embeddings: torch.Tensor) -> None:
    """Rescale a fresh projector's last layer so its outputs have the RMS of real token embeddings.

    An untrained projector otherwise emits vectors ~30x larger than any token embedding, which
    swamps attention and makes both the untrained demo and early alignment training needlessly noisy.
    """
    last = projector[-1]
    target_rms = embeddings.float().pow(2).mean().sqrt()
    # Inputs to the last layer are ~unit variance (LayerNorm, or GELU of a ~unit Linear).
    nn.init.normal_(last.weight, std=float(target_rms) / last.in_features**0.5)
    nn.init.zeros_(last.bias)
