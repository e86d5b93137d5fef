"""vLLM plugin: serves a `mmllm export vllm` folder with vLLM's own LM and mmllm's image path.

vLLM calls `register` (the `vllm.general_plugins` entry point) in each of its processes, so every one
of them knows the `mmllm` config type and which class builds its `MultimodalLM` architecture. The
class is named by string: vLLM imports it only when it builds a model.
"""

from __future__ import annotations


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from mmllm.models.configuration import MultimodalConfig

    AutoConfig.register(MultimodalConfig.model_type, MultimodalConfig, exist_ok=True)
    ModelRegistry.register_model("MultimodalLM", "mmllm.vllm_plugin.model:MmllmForVllm")
