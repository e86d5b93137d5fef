"""Vision-feature cache: run the vision tower once, store fp16 features keyed by image content hash.

Layout of a cache directory: `meta.json` (encoder fingerprint, feature shape), `features.f16`
(records of N x D float16, appended) and `keys.txt` (one content hash per record, same order).
Appends flush data before keys, so an interrupted run leaves at worst a partial last record,
which the next open trims: runs resume where they stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmllm.data.records import ImageRef, Sample, image_key
from mmllm.errors import MmllmError
from mmllm.images import load_image
from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import MultimodalProcessor

log = logging.getLogger("mmllm")

META, KEYS, DATA = "meta.json", "keys.txt", "features.f16"


def encoder_fingerprint(model: MultimodalLM, processor: MultimodalProcessor) -> str:
    """Hash of all that decides a feature: tower weights (and dtype), feature selection, preprocessing."""
    config = model.config
    digest = hashlib.sha256()
    settings = {
        "mode": config.vision_feature_mode,
        "layer": config.vision_feature_layer,
        "cls": config.vision_use_cls,
        "pixel_shuffle": config.vision_pixel_shuffle,
        "size": processor.image_processor.size,
        "mean": list(processor.image_processor.mean),
        "std": list(processor.image_processor.std),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        # reshape: 0-d tensors (BatchNorm's step counter) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Append-only, memory-mapped store of (N, D) float16 features keyed by image content hash."""

    def __init__(self, directory: str | Path, fingerprint: str, shape: tuple[int, int]):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.shape = tuple(shape)
        self.record_bytes = int(np.prod(self.shape)) * 2
        self._rows: dict[str, int] = {}
        self._array: np.memmap | None = None
        self._repair_and_index()

    @classmethod
    def open(cls, directory: str | Path, fingerprint: str) -> FeatureCache:
        """Open an existing cache for reading; refuse one made by another encoder."""
        meta_path = Path(directory) / META
        if not meta_path.is_file():
            raise MmllmError(
                f"{directory} is not a feature cache (no {META}); build one with `mmllm features`"
            )
        meta = json.loads(meta_path.read_text())
        if meta["fingerprint"] != fingerprint:
            raise MmllmError(
                f"feature cache {directory} is stale: it was made by a different vision encoder or "
                "preprocessing. Rebuild it with `mmllm features`, or delete it to train on pixels."
            )
        return cls(directory, fingerprint, tuple(meta["shape"]))

    @classmethod
    def create(cls, directory: str | Path, fingerprint: str, shape: tuple[int, int]) -> FeatureCache:
        """Open for appending: resume a matching cache, start a new one, refuse to mix encoders."""
        directory = Path(directory)
        if (directory / META).is_file():
            return cls.open(directory, fingerprint)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META).write_text(json.dumps({"fingerprint": fingerprint, "shape": list(shape)}) + "\n")
        return cls(directory, fingerprint, shape)

    def _repair_and_index(self) -> None:
        data, keys = self.directory / DATA, self.directory / KEYS
        data.touch()
        keys.touch()
        lines = [k for k in keys.read_text().split("\n") if len(k) == 64]
        count = min(len(lines), data.stat().st_size // self.record_bytes)
        if count != len(lines) or data.stat().st_size != count * self.record_bytes:
            log.info(
                "feature cache %s: trimming an interrupted write (%d complete records)", self.directory, count
            )
            with data.open("r+b") as file:
                file.truncate(count * self.record_bytes)
            keys.write_text("".join(k + "\n" for k in lines[:count]))
        self._rows = {key: row for row, key in enumerate(lines[:count])}
        self._array = None

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __getstate__(self) -> dict:
        # DataLoader workers re-open the memory map themselves.
        return {**self.__dict__, "_array": None}

    def get(self, key: str) -> torch.Tensor:
        """(N, D) float16 features of one image."""
        if self._array is None or len(self._array) < len(self._rows):
            self._array = np.memmap(
                self.directory / DATA, np.float16, "r", shape=(len(self._rows), *self.shape)
            )
        return torch.from_numpy(np.array(self._array[self._rows[key]]))

    def append(self, keys: list[str], features: torch.Tensor) -> None:
        """Add (I, N, D) features for `keys`: data first, keys second, both flushed."""
        if tuple(features.shape[1:]) != self.shape:
            raise ValueError(
                f"features of shape {tuple(features.shape[1:])} do not fit cache shape {self.shape}"
            )
        with (self.directory / DATA).open("ab") as file:
            file.write(features.detach().to(torch.float16).cpu().contiguous().numpy().tobytes())
        with (self.directory / KEYS).open("a") as file:
            file.write("".join(k + "\n" for k in keys))
        start = len(self._rows)
        self._rows.update({key: start + i for i, key in enumerate(keys)})


def unique_images(samples: Iterable[Sample]) -> Iterable[ImageRef]:
    seen: set[str] = set()
    for sample in samples:
        for ref in sample.images:
            marker = ref if isinstance(ref, str) else hashlib.sha256(ref).hexdigest()
            if marker not in seen:
                seen.add(marker)
                yield ref


@torch.inference_mode()
def build_feature_cache(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    samples: Iterable[Sample],
    directory: str | Path,
    batch_size: int = 64,
) -> Counter:
    """Encode every distinct image of `samples` not yet in the cache; returns counts (added, cached, bad)."""
    config = model.config
    cache = FeatureCache.create(
        directory, encoder_fingerprint(model, processor), (config.num_image_tokens, config.vision_feature_dim)
    )
    counts: Counter = Counter()
    pending_keys: list[str] = []
    pending_pixels: list[torch.Tensor] = []

    def flush() -> None:
        if pending_keys:
            pixels = torch.stack(pending_pixels).to(model.device)
            cache.append(pending_keys, model.get_image_features(pixels))
            counts["added"] += len(pending_keys)
            pending_keys.clear()
            pending_pixels.clear()

    for ref in tqdm(unique_images(samples), desc="features", unit="img"):
        try:
            key = image_key(ref)
            if key in cache or key in pending_keys:
                counts["cached"] += 1
                continue
            pixels = processor.image_processor.preprocess(load_image(ref))
        except (MmllmError, OSError) as err:
            counts["bad images"] += 1
            log.warning("skipping image: %s", err)
            continue
        pending_keys.append(key)
        pending_pixels.append(torch.from_numpy(pixels))
        if len(pending_keys) >= batch_size:
            flush()
    flush()
    return counts


def cache_for_training(
    directory: str, augmenting: bool, vision_trains: bool, model: MultimodalLM, processor: MultimodalProcessor
) -> FeatureCache | None:
    """The feature cache a run should use: only with a frozen vision tower and un-augmented images.

    A cache made by another encoder is refused (FeatureCache.open raises), never silently used.
    """
    if not directory:
        return None
    if vision_trains or augmenting:
        log.info(
            "feature cache %s not used: %s",
            directory,
            "the vision tower trains" if vision_trains else "images are augmented",
        )
        return None
    cache = FeatureCache.open(directory, encoder_fingerprint(model, processor))
    log.info("feature cache %s: %d images", directory, len(cache))
    return cache
