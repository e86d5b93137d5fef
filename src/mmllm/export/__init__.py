"""Exports for other engines: transformers' Llava (vLLM/SGLang), INT8 for CPU, ONNX, GGUF."""
