"""The seed's optional contrastive image-text alignment loss (CLIP's symmetric InfoNCE)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import IGNORE_INDEX


def contrastive_loss(
    model: MultimodalLM, batch: dict, temperature: float = 0.07, ignore_ids: Sequence[int] = ()
) -> torch.Tensor:
    """Pull each image's mean projected feature towards the mean embedding of its own answer tokens.

    Needs one image per sample; other samples in the batch are the negatives. A trainable vision
    tower learns through it too (a cheap way to give a tower trained from scratch its first features).
    """
    features = batch.get("image_features")
    if features is None:
        tower_trains = any(p.requires_grad for p in model.vision_tower.parameters())
        with nullcontext() if tower_trains else torch.no_grad():
            features = model.get_image_features(batch["pixel_values"])
    if features.shape[0] != batch["input_ids"].shape[0]:
        raise ValueError("the contrastive loss needs exactly one image per sample")
    images = F.normalize(
        model.projector(features.to(model.projector[0].weight.dtype)).mean(1), dim=-1
    )  # (B, D)
    labels = batch["labels"]
    # End-of-turn tokens (`ignore_ids`) end every answer: they would pull all texts together.
    ends = torch.isin(labels, torch.tensor(list(ignore_ids), device=labels.device))
    answer = ((labels != IGNORE_INDEX) & ~ends).unsqueeze(-1)  # (B, T, 1)
    with torch.no_grad():
        tokens = model.get_input_embeddings()(
            batch["input_ids"].clamp(max=model.get_input_embeddings().num_embeddings - 1)
        )
    texts = F.normalize((tokens * answer).sum(1) / answer.sum(1).clamp(min=1), dim=-1)  # (B, D)
    logits = images @ texts.to(images.dtype).T / temperature  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
