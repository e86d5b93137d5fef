"""What the backends over an export folder share: reading its settings, and the exported vision graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmllm.engine.backend import Backend
from mmllm.engine.settings import GenerationSettings
from mmllm.errors import MmllmError
from mmllm.models.labels import describe_images
from mmllm.processor import MultimodalProcessor


def read_export_settings(path: Path, filename: str, version: int, command: str) -> dict:
    """The settings file of an export folder, refused when missing or written by another format."""
    if not (path / filename).is_file():
        raise MmllmError(f"{path} is not a `mmllm {command}` folder (no {filename}); run `mmllm {command}`")
    settings = json.loads((path / filename).read_text())
    if settings.get("format") != version:
        raise MmllmError(f"{path} was exported by an older mmllm; export it again with `mmllm {command}`")
    return settings


def onnx_session(path: Path, threads: int = 0):
    try:
        import onnxruntime as ort
    except ImportError:
        raise MmllmError(
            "this backend needs onnxruntime: pip install -e '.[export]' in mmllm's checkout"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ExportedBackend(Backend):
    """A backend over an export folder: its settings file, and image rows from the exported vision graph
    (`vision.onnx`: tower + projector, the one projection path) run by onnxruntime, whatever engine
    then runs the language model (onnxruntime, llama.cpp)."""

    def __init__(self, processor: MultimodalProcessor, vision, settings: dict):
        super().__init__(processor)
        self.vision = vision  # an onnxruntime InferenceSession
        self.settings = settings

    def check(self, settings: GenerationSettings) -> None:
        """Both engines decode with `choose_tokens`: greedy or sampled, one token a row a step."""
        super().check(settings)
        if settings.num_beams > 1:
            raise ValueError(f"the {self.name} backend decodes greedily or by sampling (num_beams must be 1)")
        if settings.repetition_penalty != 1.0:
            raise ValueError(
                f"the {self.name} backend has no repetition penalty (repetition_penalty must be 1.0)"
            )

    @property
    def reads_images_as_words(self) -> bool:
        return self.settings.get("labels_bridge") is not None

    @property
    def context_length(self) -> int:
        return self.settings["context_length"]

    @property
    def trained_parts(self) -> list[str]:
        return self.settings["trained_parts"]

    def image_rows(self, pixels: np.ndarray) -> np.ndarray:
        """(I, 3, S, S) pixels -> (I, N, D) LM rows (or (I, 1, C) class probabilities for a model that
        reads images as words), from the LRU cache when seen before."""
        return np.stack(self.features.through(pixels, lambda rows: self._vision(pixels[rows])))

    def image_words(self, pixels: np.ndarray) -> list[str]:
        return describe_images(self.image_rows(pixels), self.settings["labels_bridge"])

    def _vision(self, pixels: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"pixel_values": pixels})[0]
