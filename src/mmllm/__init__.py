"""mmllm: build, train, evaluate and serve small multimodal LLMs.

Importing the package registers `MultimodalConfig`/`MultimodalLM` with transformers' Auto classes.
"""

import logging

# transformers imports torchao when it is installed (the export extra): torchao then logs that its
# CUDA-only kernels cannot load and torch warns about its pytree registrations, on every command.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from transformers import (  # noqa: E402 (after the logger levels above)
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
)

from mmllm.models.build import ModelConfig, build_model, load_model  # noqa: E402
from mmllm.models.configuration import MultimodalConfig  # noqa: E402
from mmllm.models.multimodal import MultimodalLM  # noqa: E402
from mmllm.processor import MultimodalProcessor  # noqa: E402

AutoConfig.register(MultimodalConfig.model_type, MultimodalConfig, exist_ok=True)
for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    auto_class.register(MultimodalConfig, MultimodalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "ModelConfig",
    "MultimodalConfig",
    "MultimodalLM",
    "MultimodalProcessor",
    "build_model",
    "load_model",
]
