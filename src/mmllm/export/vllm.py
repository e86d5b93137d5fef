"""`mmllm export vllm`: a self-contained folder that vLLM serves through mmllm's plugin (`vllm_plugin/`).

A saved mmllm model usually stores only what it trained (a LoRA adapter, the projector) and names its
base LM; vLLM loads one folder. The export merges the adapter and writes every part's weights, the
tokenizer with the chat template the model answers in, and the processor settings, so `vllm serve`
needs neither mmllm's weight registry nor peft.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmllm.errors import MmllmError
from mmllm.models.build import load_model, resolve_model_name
from mmllm.models.configuration import MultimodalConfig, is_mmllm_model

log = logging.getLogger("mmllm")

# The LM architectures whose vLLM implementation the plugin was tested with (tests/test_vllm.py).
VLLM_LANGUAGE_MODELS = ("Qwen2ForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM")


def check_language_model(config: MultimodalConfig) -> str:
    """The LM architecture vLLM will build for this model; a clear error for one the plugin cannot serve."""
    architecture = (config.text_config.architectures or [None])[0]
    if architecture not in VLLM_LANGUAGE_MODELS:
        raise MmllmError(
            f"the vLLM plugin serves {', '.join(VLLM_LANGUAGE_MODELS)} language models; this model's is "
            f"{architecture or config.text_config.model_type}"
        )
    return architecture


def export_vllm(model_name: str, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    path = resolve_model_name(model_name)
    if not is_mmllm_model(path):
        raise MmllmError(
            f"{model_name} is not a saved mmllm model (its config.json names no model_type mmllm)"
        )
    model, processor = load_model(path, dtype=dtype)
    model.merge_lora()
    text_config = model.language_model.config
    # A config built in code (not loaded from a hub folder) may not name its class; vLLM picks by it.
    text_config.architectures = text_config.architectures or [type(model.language_model).__name__]
    model.config.text_config = text_config
    check_language_model(model.config)
    model.config.text_model_name_or_path = None  # the folder holds the merged weights, not the base's
    model.save_pretrained(out)
    # vLLM renders chats with the tokenizer's template: make it the one the model answers in.
    processor.tokenizer.chat_template = processor.template
    processor.save_pretrained(out)
    log.info("wrote %s (serve it with `vllm serve %s`)", out, out)
    return Path(out)
