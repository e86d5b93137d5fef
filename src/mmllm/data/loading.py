"""From samples to batches: mixing, length-grouped sampling, robust collation, DataLoader settings.

A run never dies on one bad file: unreadable images drop their sample, and every drop or cut is
counted in the batch's `stats` and summed by `LoadReport` for the end-of-run summary.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from mmllm.conversation import IGNORE_INDEX
from mmllm.data.augment import augment, augment_questions
from mmllm.data.config import DataConfig
from mmllm.data.features import FeatureCache
from mmllm.data.readers import STREAMED, read
from mmllm.data.records import Sample, image_key
from mmllm.errors import MmllmError
from mmllm.images import load_image
from mmllm.processor import ALIGN_TEMPLATE, MultimodalProcessor

log = logging.getLogger("mmllm")
PACK_WIDTHS = 64  # row widths tried when packing a batch: bounded work in the collator, at any max_length


class SampleList(Dataset):
    """Map-style dataset over samples read in full (all formats but the streamed ones).

    `sizes` holds how many samples each dataset of the recipe contributed, in order.
    """

    def __init__(self, samples: list[Sample], sizes: list[int]):
        self.samples, self.sizes = samples, sizes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


class StreamedMixture(IterableDataset):
    """Streams datasets interleaved by weight; each DataLoader worker takes every k-th sample."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        worker = get_worker_info()
        rank, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        rng = random.Random(self.cfg.seed + self.epoch)
        sources = [(read(spec, self.cfg), spec.weight) for spec in self.cfg.datasets]
        for n in itertools.count():
            if not sources:
                return
            index = rng.choices(range(len(sources)), weights=[w for _, w in sources])[0]
            sample = next(sources[index][0], None)
            if sample is None:
                sources.pop(index)
            elif n % workers == rank:
                yield sample


def open_dataset(cfg: DataConfig) -> SampleList | StreamedMixture:
    """Map-style when every dataset can be read whole; a streamed mixture when any is a stream."""
    if not cfg.datasets:
        raise MmllmError("the data config names no datasets")
    if any(spec.format in STREAMED for spec in cfg.datasets):
        return StreamedMixture(cfg)
    parts = [list(read(spec, cfg)) for spec in cfg.datasets]
    return SampleList([s for part in parts for s in part], [len(part) for part in parts])


def estimated_length(sample: Sample, num_image_tokens: int) -> int:
    """Token count estimate (4 characters a token) for length grouping; no tokenizer needed."""
    return sum(len(m["content"]) for m in sample.conversation) // 4 + len(sample.images) * num_image_tokens


class MixtureBatchSampler(Sampler[list[int]]):
    """Batches of indices into concatenated datasets.

    Each epoch draws `weight x size` samples of each dataset (repeating when weight > 1), shuffles
    them, and — with `lengths` — sorts within mega-batches of 50 batches so a batch holds samples of
    similar length, then shuffles the batches (the Hugging Face/LLaVA "group by length" scheme).
    """

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        batch_size: int,
        lengths: list[int] | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.sizes, self.weights, self.batch_size = sizes, weights, batch_size
        self.lengths, self.seed, self.drop_last = lengths, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, rng: random.Random) -> list[int]:
        indices, offset = [], 0
        for size, weight in zip(self.sizes, self.weights, strict=True):
            draws = round(weight * size)
            pool = list(range(offset, offset + size))
            for _ in range(draws // size if size else 0):
                indices += pool
            indices += rng.sample(pool, draws % size) if size else []
            offset += size
        rng.shuffle(indices)
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        indices = self._indices(rng)
        if self.lengths is not None:
            mega = self.batch_size * 50
            indices = [
                i
                for start in range(0, len(indices), mega)
                for i in sorted(indices[start : start + mega], key=self.lengths.__getitem__, reverse=True)
            ]
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        rng.shuffle(batches)
        yield from batches

    def __len__(self) -> int:
        total = sum(round(w * s) for s, w in zip(self.sizes, self.weights, strict=True))
        return total // self.batch_size if self.drop_last else math.ceil(total / self.batch_size)


def truncate(encoded: dict[str, Any], max_length: int, image_token_id: int) -> str | None:
    """Cut a too-long sample's tail (its last answers), in place. Returns why it must be dropped, if so.

    Image placeholders are never cut: a sample whose images do not fit is dropped, not blinded.
    """
    ids = encoded["input_ids"]
    if len(ids) > max_length:
        if image_token_id in ids[max_length:]:
            return "images beyond max_length"
        encoded["input_ids"], encoded["labels"] = ids[:max_length], encoded["labels"][:max_length]
        encoded["truncated"] = True
    if all(label == IGNORE_INDEX for label in encoded["labels"]):
        return "no answer tokens left"
    return None


def processor_for(cfg: DataConfig, processor: MultimodalProcessor) -> MultimodalProcessor:
    """The processor rendering conversations in `cfg.conversation_format` (the saved model answers so)."""
    return processor.with_template(ALIGN_TEMPLATE if cfg.conversation_format == "plain" else None)


class Collator:
    """Samples -> a right-padded training batch; bad images and over-long samples are dropped and counted.

    Conversations render with the processor as given: a training run sets its format once
    (`processor_for`), and an evaluation uses the model's own, as generation does.

    With a feature cache, a batch whose images are all cached carries `image_features` instead of
    `pixel_values`; otherwise it falls back to pixels (and counts the cache misses).
    """

    def __init__(
        self,
        processor: MultimodalProcessor,
        cfg: DataConfig,
        feature_cache: FeatureCache | None = None,
        train: bool = True,
    ):
        self.processor, self.cfg, self.feature_cache, self.train = processor, cfg, feature_cache, train
        self.rng = random.Random(cfg.seed)

    def _cached_keys(self, samples: list[Sample], stats: Counter) -> list[list[str]] | None:
        """Content hashes of every sample's images when the cache holds them all, else None."""
        if self.feature_cache is None or (self.train and self.cfg.augment.enabled):
            return None
        try:
            keys = [[image_key(ref) for ref in sample.images] for sample in samples]
        except OSError:
            return None  # a missing file: the pixel path below reports it
        misses = sum(k not in self.feature_cache for row in keys for k in row)
        stats["cache misses"] += misses
        return None if misses else keys

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        stats: Counter = Counter(samples=len(samples))
        bad: list[str] = []
        encoded, features = [], []
        cached_keys = self._cached_keys(samples, stats)
        for n, sample in enumerate(samples):
            conversation = sample.conversation
            if self.train:
                conversation = augment_questions(conversation, self.cfg.augment, self.rng)
            try:
                if cached_keys is not None:
                    item = self.processor.encode_text(conversation, len(sample.images), train=True)
                    item["cached_features"] = [self.feature_cache.get(k) for k in cached_keys[n]]
                else:
                    images = [load_image(ref) for ref in sample.images]
                    if self.train and self.cfg.augment.enabled:
                        images = [augment(image, self.cfg.augment, self.rng) for image in images]
                    item = self.processor.encode(conversation, images, train=True)
            except (MmllmError, OSError) as err:
                stats["bad images"] += 1
                bad.append(str(err))
                continue
            except ValueError as err:  # e.g. marker/image count mismatch in the annotations
                stats["bad samples"] += 1
                bad.append(f"{sample.id}: {err}")
                continue
            reason = truncate(item, self.cfg.max_length, self.processor.image_token_id)
            if reason:
                stats[f"dropped: {reason}"] += 1
                continue
            stats["truncated"] += item.pop("truncated", False)
            encoded.append(item)
        if self.cfg.pack and encoded:
            rows = [[encoded[i] for i in row] for row in pack_rows(encoded, self.cfg.max_length)]
            encoded = [item for row in rows for item in row]  # images and features in row order
            batch = self._packed(rows)
        else:
            batch = self.processor.pad(encoded, padding_side="right") if encoded else {}
        features = [f for item in encoded for f in item.get("cached_features", ())]
        if features:
            batch["image_features"] = torch.stack(features)  # (I, N, D) float16
        stats["kept"] = len(encoded)
        batch["stats"], batch["problems"] = stats, bad
        return batch

    def _packed(self, ordered: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """Rows of samples -> (R, T) tensors, each sample's positions counting from 0: with no attention
        mask, the LM confines each sample's attention to itself (transformers reads the boundaries off
        the positions: a block-diagonal mask for SDPA, varlen for flash-attention). A row's tail of pad
        tokens is a block of its own, with no labels. `real_tokens`: the tokens that are not padding."""
        width = max(sum(len(e["input_ids"]) for e in row) for row in ordered)
        ids, labels, positions = [], [], []
        pad_id = self.processor.tokenizer.pad_token_id
        for row in ordered:
            tail = width - sum(len(e["input_ids"]) for e in row)
            ids.append([t for e in row for t in e["input_ids"]] + [pad_id] * tail)
            labels.append([t for e in row for t in e["labels"]] + [IGNORE_INDEX] * tail)
            positions.append([p for e in row for p in range(len(e["input_ids"]))] + list(range(tail)))
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
            "real_tokens": sum(len(e["input_ids"]) for row in ordered for e in row),
        }
        pixels = [e["pixel_values"] for row in ordered for e in row if e.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat([torch.as_tensor(p) for p in pixels])
        return batch


def pack_rows(encoded: list[dict[str, Any]], max_length: int) -> list[list[int]]:
    """Which samples share each row. The rows are padded to the longest, so the packing is the first fit
    (longest samples first) into rows of the width, from the longest sample's to `max_length`, that
    leaves the least padding (of equals, the narrowest: less attention work). The longest sample's
    width already packs no worse than padding each sample to it, so a packed batch never holds more
    pad tokens than the padded one."""
    lengths = [len(item["input_ids"]) for item in encoded]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest = max(lengths)  # samples are truncated to max_length
    widths = sorted({longest + (max_length - longest) * k // (PACK_WIDTHS - 1) for k in range(PACK_WIDTHS)})
    best: tuple[int, list[list[int]]] | None = None
    for width in widths:
        rows: list[list[int]] = []
        room: list[int] = []
        for index in order:
            row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
            if row is None:
                rows.append([])
                room.append(width)
                row = len(rows) - 1
            rows[row].append(index)
            room[row] -= lengths[index]
        area = len(rows) * (width - min(room))  # rows x the fullest row's tokens
        if best is None or area < best[0]:
            best = (area, rows)
    return best[1]


class LoadReport:
    """Sums the per-batch counts of a run and says, at the end, what was skipped or cut."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def update(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Take the bookkeeping out of a batch (so the rest can go to the model) and count it."""
        self.counts.update(batch.pop("stats"))
        problems = batch.pop("problems")
        self.examples += problems[: max(0, 5 - len(self.examples))]
        return batch

    def summary(self) -> str:
        kept, seen = self.counts["kept"], self.counts["samples"]
        parts = [f"{kept}/{seen} sample draws used"]  # a sample is drawn once per epoch (and per weight)
        parts += [f"{v} {k}" for k, v in sorted(self.counts.items()) if k not in ("kept", "samples") and v]
        text = "data: " + ", ".join(parts)
        if self.examples:
            text += "\n  e.g. " + "\n  e.g. ".join(self.examples)
        return text


def build_dataloader(
    cfg: DataConfig,
    processor: MultimodalProcessor,
    *,
    feature_cache: FeatureCache | None = None,
    shuffle: bool = True,
    train: bool = True,
) -> DataLoader:
    """The DataLoader for a data recipe: mixture sampling, length grouping, workers, pinned memory."""
    dataset = open_dataset(cfg)
    collator = Collator(processor, cfg, feature_cache, train)
    workers = cfg.num_workers
    common = {
        "collate_fn": collator,
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": workers > 0,
        "prefetch_factor": 4 if workers > 0 else None,
        # Own generator: starting an iterator must not draw from the global RNG that dropout
        # uses, or a resumed run would see different dropout masks than an uninterrupted one.
        "generator": torch.Generator().manual_seed(cfg.seed),
    }
    if isinstance(dataset, StreamedMixture):
        return DataLoader(dataset, batch_size=cfg.batch_size, **common)
    if not shuffle:
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, **common)
    lengths = None
    if cfg.group_by_length:
        lengths = [estimated_length(s, processor.num_image_tokens) for s in dataset.samples]
    sampler = MixtureBatchSampler(
        dataset.sizes, [spec.weight for spec in cfg.datasets], cfg.batch_size, lengths, cfg.seed
    )
    return DataLoader(dataset, batch_sampler=sampler, **common)
