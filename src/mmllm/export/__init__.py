"""Exports for other engines: transformers' Llava (the hub's llava-hf layout), INT8 for CPU, ONNX, GGUF."""
