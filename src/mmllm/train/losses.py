"""Losses on projector outputs, no LM forward needed: CLIP's contrastive alignment (the seed's option)
and a regression of image tokens onto the words that describe the image."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

from mmllm.conversation import IGNORE_INDEX
from mmllm.models.multimodal import MultimodalLM
from mmllm.train.config import TrainConfig


def projected_images(model: MultimodalLM, batch: dict) -> torch.Tensor:
    """(B, N, D) image tokens as the projector gives them, before any snapping to words (the losses
    train the projector towards the words); one image per sample."""
    features = batch.get("image_features")
    if features is None:
        tower_trains = any(p.requires_grad for p in model.vision_tower.parameters())
        with nullcontext() if tower_trains else torch.no_grad():
            features = model.get_image_features(batch["pixel_values"])
    if features.shape[0] != batch["input_ids"].shape[0]:
        raise ValueError("losses on image tokens need exactly one image per sample")
    return model.projector(features)


def answer_mask(labels: torch.Tensor, ignore_ids: Sequence[int]) -> torch.Tensor:
    """(B, T) True on answer tokens. End-of-turn tokens (`ignore_ids`) end every answer: they describe
    no image."""
    ends = torch.isin(labels, torch.tensor(list(ignore_ids), device=labels.device))
    return (labels != IGNORE_INDEX) & ~ends


@torch.no_grad()
def _token_embeddings(model: MultimodalLM, input_ids: torch.Tensor) -> torch.Tensor:
    table = model.get_input_embeddings()
    return table(input_ids.clamp(max=table.num_embeddings - 1))  # image placeholders lie past the table


def contrastive_loss(
    model: MultimodalLM, batch: dict, temperature: float = 0.07, ignore_ids: Sequence[int] = ()
) -> torch.Tensor:
    """Pull each image's mean projected feature towards the mean embedding of its own answer tokens.

    Needs one image per sample; other samples in the batch are the negatives. A trainable vision
    tower learns through it too (a cheap way to give a tower trained from scratch its first features).
    """
    images = F.normalize(projected_images(model, batch).mean(1), dim=-1)  # (B, D)
    answer = answer_mask(batch["labels"], ignore_ids).unsqueeze(-1)  # (B, T, 1)
    tokens = _token_embeddings(model, batch["input_ids"])
    texts = F.normalize((tokens * answer).sum(1) / answer.sum(1).clamp(min=1), dim=-1)  # (B, D)
    logits = images @ texts.to(images.dtype).T / temperature  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def token_target_loss(
    model: MultimodalLM, batch: dict, ignore_ids: Sequence[int] = (), vocab_weight: float = 0.0
) -> torch.Tensor:
    """Regress each image's N tokens onto the LM's input embeddings of its answer's n tokens, in order:
    answer token j is the target of image tokens [j N/n, (j+1) N/n). The LM then reads an image as the
    words of its description and can compare it with a question's words as it compares words in text.

    The answers must describe each image fully and the same way for images that look alike ("red
    circle"): where they disagree (one image's answer names only its colour, another's both), a
    regression fits their average, which is no word at all. Mean squared error relative to the targets'
    mean square, so 1.0 is what all-zero tokens score. `vocab_weight` adds the cross-entropy of each
    token's dot products with the whole embedding table against its target word: a squared error does
    not care which way it misses, and related words lie close together.
    """
    images = projected_images(model, batch)  # (B, N, D)
    answer = answer_mask(batch["labels"], ignore_ids)
    slots = torch.arange(images.shape[1], device=images.device)
    targets = []
    for sample_ids, sample_answer in zip(batch["input_ids"], answer, strict=True):
        described = sample_ids[sample_answer]  # (n,)
        if not len(described):
            raise ValueError("token_target_weight needs an answer (a description) for every image")
        targets.append(described[slots * len(described) // len(slots)])  # (N,)
    targets = torch.stack(targets)  # (B, N) token ids
    table = model.get_input_embeddings().weight.detach().to(images.dtype)  # (V, D)
    words = table[targets]  # (B, N, D)
    loss = F.mse_loss(images, words) / words.pow(2).mean()
    if vocab_weight:
        loss = loss + vocab_weight * F.cross_entropy((images @ table.T).flatten(0, 1), targets.flatten())
    return loss


class ImageLosses:
    """The recipe's losses on image tokens alone (no LM forward needed), as one weighted sum."""

    def __init__(self, cfg: TrainConfig):
        vocab = cfg.token_target_vocab_weight
        terms = (
            (contrastive_loss, cfg.contrastive_weight),
            (partial(token_target_loss, vocab_weight=vocab), cfg.token_target_weight),
        )
        self.terms = [(loss, weight) for loss, weight in terms if weight]

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __call__(self, model: MultimodalLM, batch: dict, ignore_ids: Sequence[int]) -> torch.Tensor:
        return sum(weight * loss(model, batch, ignore_ids=ignore_ids) for loss, weight in self.terms)
