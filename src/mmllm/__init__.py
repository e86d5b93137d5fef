"""mmllm: build, train, evaluate and serve small multimodal LLMs.

Importing the package registers `MultimodalConfig`/`MultimodalLM` with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
)

from mmllm.models.build import ModelConfig, build_model, load_model
from mmllm.models.configuration import MultimodalConfig
from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import MultimodalProcessor

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
