"""Language model: any HF causal LM, from a registry name, hub id, local directory or GGUF file; a
directory with a config and no weights gives that architecture with random weights (benchmarks)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mmllm.errors import MmllmError
from mmllm.weights import resolve

log = logging.getLogger("mmllm")


def load_language_model(
    name_or_path: str, dtype: torch.dtype | str | None = None, quantization_config: Any = None
) -> PreTrainedModel:
    resolved = resolve(name_or_path, kind="lm")
    log.info("language model: %s", resolved.source)
    if config_only(resolved.path):
        log.warning("%s holds a config and no weights: the language model has random weights", resolved.path)
        config = AutoConfig.from_pretrained(resolved.path)
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path,
            gguf_file=resolved.gguf_file,
            dtype=dtype or torch.float32,
            quantization_config=quantization_config,
        )
    except OSError as err:
        raise MmllmError(f"cannot load language model '{name_or_path}': {err}") from err
    if resolved.gguf_file:  # a GGUF load leaves a quantizer attached though the weights are plain tensors
        model.hf_quantizer = None
    return model


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.safetensors.index.json")


def config_only(path: str) -> bool:
    folder = Path(path)
    return (folder / "config.json").is_file() and not any(any(folder.glob(w)) for w in WEIGHT_FILES)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    resolved = resolve(name_or_path, kind="lm")
    try:
        return AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    except OSError as err:
        raise MmllmError(f"cannot load tokenizer of '{name_or_path}': {err}") from err


def cache_keyword(model: PreTrainedModel) -> str:
    """The name under which this transformers version's forward takes the KV cache (renamed in 5.24)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
