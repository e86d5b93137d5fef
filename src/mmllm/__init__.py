"""mmllm: build, train, evaluate and serve small multimodal LLMs.

The package's names load on first use: a backend that runs an export (onnx, llama.cpp) never imports
torch. Importing `mmllm.models.multimodal` registers `MultimodalConfig`/`MultimodalLM` with
transformers' Auto classes.
"""

import importlib
import logging

# transformers imports torchao when it is installed (the export extra): torchao then logs that its
# CUDA-only kernels cannot load and torch warns about its pytree registrations, on every command.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

_HOMES = {
    "ModelConfig": "mmllm.models.design",
    "build_model": "mmllm.models.build",
    "load_model": "mmllm.models.build",
    "MultimodalConfig": "mmllm.models.configuration",
    "MultimodalLM": "mmllm.models.multimodal",
    "MultimodalProcessor": "mmllm.processor",
}

__version__ = "0.2.0"
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'mmllm' has no attribute {name!r}")
