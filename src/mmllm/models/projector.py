"""Projector: maps vision features into the language model's embedding space."""

from __future__ import annotations

import torch
from torch import nn

from mmllm.models.design import PROJECTOR_TYPES


class Projector(nn.Sequential):
    """`mlp_ln`: Linear -> ReLU -> LayerNorm -> Linear (the seed design); `mlp_gelu`: LLaVA-1.5's
    Linear -> GELU -> Linear. (I, N, D_v) -> (I, N, D). `labels` has no layers: its model reads images
    as words (`MultimodalLM.image_words`).

    A `Sequential` underneath, so saved weights keep their `projector.0.weight` names.
    """

    def __init__(self, kind: str, vision_dim: int, text_dim: int):
        if kind == "mlp_ln":
            layers = (
                nn.Linear(vision_dim, text_dim),
                nn.ReLU(),
                nn.LayerNorm(text_dim),
                nn.Linear(text_dim, text_dim),
            )
        elif kind == "mlp_gelu":
            layers = (nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
        elif kind == "labels":
            layers = ()
        else:
            raise ValueError(f"unknown projector type {kind!r}; choose one of {PROJECTOR_TYPES}")
        super().__init__(*layers)
        self.kind = kind

    @property
    def linears(self) -> list[nn.Linear]:
        return [layer for layer in self if isinstance(layer, nn.Linear)]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # not a weight's: a packed linear (CPU inference) has none

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features.to(self.dtype))

    @torch.no_grad()
    def match_embedding_scale(self, embeddings: torch.Tensor) -> None:
        """Rescale a fresh projector's last layer so its outputs have the RMS of real token embeddings.

        An untrained projector otherwise emits vectors ~30x larger than any token embedding, which
        swamps attention and makes both the untrained demo and early alignment training needlessly noisy.
        """
        if not self.linears:
            return
        last = self.linears[-1]
        target_rms = embeddings.float().pow(2).mean().sqrt()
        # Inputs to the last layer are ~unit variance (LayerNorm, or GELU of a ~unit Linear).
        nn.init.normal_(last.weight, std=float(target_rms) / last.in_features**0.5)
        nn.init.zeros_(last.bias)
