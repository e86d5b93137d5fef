"""`MmllmForVllm`: mmllm's vision tower and projector in front of vLLM's own implementation of the LM.

Image rows come from mmllm's modules and `MultimodalLM`'s own methods (`get_image_features`,
`project_images` with its snap to words), borrowed rather than rewritten, so a design choice made there
reaches vLLM too. A labels model has no rows: the front end put its image's words in the prompt
(`processing.py`), and their "embeddings" are the LM's embeddings of those words.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from mmllm.errors import MmllmError
from mmllm.export.vllm import check_language_model
from mmllm.models.configuration import PARTS, MultimodalConfig
from mmllm.models.multimodal import MultimodalLM
from mmllm.models.projector import Projector
from mmllm.models.vision import tower_from_config
from mmllm.vllm_plugin.processing import (
    MmllmDummyInputsBuilder,
    MmllmMultiModalProcessor,
    MmllmProcessingInfo,
)

LM_PREFIX = "language_model."


def check_servable(config: MultimodalConfig) -> None:
    """A one-line reason why vLLM cannot serve this folder as it is, if it cannot."""
    if config.adapter or set(config.saved_parts or PARTS) != set(PARTS):
        raise MmllmError(
            "this mmllm model stores only its trained parts (a LoRA adapter, a base LM by name): "
            "run `mmllm export vllm MODEL OUT` and serve OUT"
        )
    check_language_model(config)


@MULTIMODAL_REGISTRY.register_processor(
    MmllmMultiModalProcessor, info=MmllmProcessingInfo, dummy_inputs=MmllmDummyInputsBuilder
)
class MmllmForVllm(nn.Module, SupportsMultiModal, SupportsPP):
    get_image_features = MultimodalLM.get_image_features
    project_images = MultimodalLM.project_images
    snap_to_vocab = MultimodalLM.snap_to_vocab
    nearest_words = MultimodalLM.nearest_words

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("mmllm models read images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: MultimodalConfig = vllm_config.model_config.hf_config
        check_servable(config)
        if config.projector_snap_to_vocab and get_tensor_model_parallel_world_size() > 1:
            raise MmllmError(
                "projector_snap_to_vocab compares image tokens with the whole vocabulary: serve without -tp"
            )
        self.config = config
        # vLLM hands the composite config's tying to the LM it builds; ours lives in the LM's own config.
        config.tie_word_embeddings = config.text_config.tie_word_embeddings
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            if not config.reads_images_as_words:
                self.vision_tower = tower_from_config(config.vision_config, config.vision_feature_mode)
                self.projector = Projector(
                    config.projector_type, config.vision_feature_dim, config.text_config.hidden_size
                )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def get_input_embeddings(self) -> SimpleNamespace:
        """The vocabulary's embedding table, for the snap to words (vLLM pads its table past it)."""
        table = self.language_model.model.embed_tokens.weight
        return SimpleNamespace(weight=table[: self.config.text_config.vocab_size])

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        if self.config.reads_images_as_words:
            word_ids = kwargs.get("word_ids")  # a list, or (I, n) when the images' sentences are as long
            if word_ids is None:
                return []
            return [self.language_model.embed_input_ids(ids) for ids in word_ids]
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, list):
            pixel_values = torch.stack(pixel_values)
        return self.project_images(self.get_image_features(pixel_values))  # (I, N, D)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The LM's weights through vLLM's loader (it fuses and shards them); the tower's and the
        projector's as mmllm saved them, strictly."""
        image_parts: dict[str, torch.Tensor] = {}

        def lm_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith(LM_PREFIX):
                    yield name[len(LM_PREFIX) :], tensor
                else:
                    image_parts[name] = tensor

        loaded = {LM_PREFIX + name for name in self.language_model.load_weights(lm_weights())}
        if self.config.reads_images_as_words:  # its tower runs in the front end (processing.py)
            return loaded
        for part in ("vision_tower", "projector"):
            module, prefix = getattr(self, part), f"{part}."
            state = {k[len(prefix) :]: v for k, v in image_parts.items() if k.startswith(prefix)}
            module.load_state_dict(state, strict=True)
            loaded |= {prefix + name for name in module.state_dict()}
        return loaded
