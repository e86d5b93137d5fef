"""What vLLM's front end does with a request's images: mmllm's own preprocessing, and `<image>` expanded
to the tokens the model reads — `num_image_tokens` placeholders, or (a labels model) the words the
labels bridge makes of the image, so the prompt is the one mmllm's torch backend builds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache, cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from mmllm.images import ImageProcessor
from mmllm.models.configuration import MultimodalConfig
from mmllm.models.labels import describe_images
from mmllm.models.vision import VisionTower, image_features, tower_from_config
from mmllm.processor import MultimodalProcessor

# The most tokens one image's words may take (the labels bridge's sentence is about 60-120 tokens):
# vLLM sizes its encoder cache by it before it has seen an image.
MAX_WORD_TOKENS = 384


@cache
def _labels_tower(folder: str) -> VisionTower:
    """The classifier of a labels model, for the front end to read images as words with (the engine
    never runs it: its words are ordinary tokens there)."""
    config = MultimodalConfig.from_pretrained(folder)
    tower = tower_from_config(config.vision_config, config.vision_feature_mode)
    prefix = "vision_tower."
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as weights:
        state = {k[len(prefix) :]: weights.get_tensor(k) for k in weights.keys() if k.startswith(prefix)}  # noqa: SIM118
    tower.load_state_dict(state, strict=True)
    return tower.eval()


class MmllmProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MultimodalConfig:
        return self.ctx.get_hf_config(MultimodalConfig)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def image_processor(self) -> ImageProcessor:
        """The folder's preprocessing, mmllm's own (EXIF, resize, crop, the tower's mean and std)."""
        return MultimodalProcessor.from_pretrained(self.model_id, without_torch=True).image_processor

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        config = self.get_hf_config()
        if config.reads_images_as_words:
            return {"image": min(MAX_WORD_TOKENS, seq_len)}
        return {"image": config.num_image_tokens}

    def image_word_ids(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(I, 3, S, S) pixels -> each image's words as token ids: the labels bridge's sentence."""
        config = self.get_hf_config()
        tower = _labels_tower(self.model_id)
        with torch.inference_mode():
            features = image_features(tower, pixels.to(tower.dtype), config)
        tokenizer = self.get_tokenizer()
        ids = [
            tokenizer.encode(words, add_special_tokens=False)
            for words in describe_images(features, config.labels_bridge)
        ]
        if (longest := max(map(len, ids))) > MAX_WORD_TOKENS:
            raise ValueError(f"an image reads as {longest} tokens; the plugin allows {MAX_WORD_TOKENS}")
        return [torch.tensor(row) for row in ids]


class MmllmDummyInputsBuilder(BaseDummyInputsBuilder[MmllmProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_config().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.image_processor.size
        images = self._get_dummy_images(
            width=size, height=size, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
        )
        return {"image": images}


class MmllmMultiModalProcessor(BaseMultiModalProcessor[MmllmProcessingInfo]):
    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        pixels = self.info.image_processor(list(hf_data["images"]))  # (I, 3, S, S)
        if self.info.get_hf_config().reads_images_as_words:
            return BatchFeature({"word_ids": self.info.image_word_ids(pixels)})
        return BatchFeature({"pixel_values": pixels})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        field = "word_ids" if self.info.get_hf_config().reads_images_as_words else "pixel_values"
        return {field: MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        if config.reads_images_as_words:

            def replacement(item: int) -> list[int]:
                # From the processed item, not the image: a cached item comes back without its image.
                return out_mm_kwargs["image"][item]["word_ids"].data.tolist()

        else:
            replacement = [config.image_token_id] * config.num_image_tokens
        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=replacement)]
