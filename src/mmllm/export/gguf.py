"""`mmllm export gguf`: the (LoRA-merged) language model as GGUF for llama.cpp and Ollama.

GGUF holds a text LM; the vision tower and projector stay in mmllm (llama.cpp's multimodal path,
mtmd, wants its own CLIP/projector file format). Written with the `gguf` package's writer and its
tensor-name map, for the architectures we ship (qwen2: Qwen2.5; llama: SmolLM2, Llama); the byte-level
BPE tokenizer goes in as llama.cpp's `gpt2` model with its merges and chat template.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from mmllm.errors import MmllmError

log = logging.getLogger("mmllm")

# llama.cpp pre-tokenizer names: how text is split before BPE (its `tokenizer.ggml.pre`).
DEFAULT_PRE = {"qwen2": "qwen2", "llama": "llama-bpe"}


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout for llama q/k projections (convert_hf_to_gguf does the same)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _tokenizer_metadata(writer, processor, vocab_size: int, pre: str) -> None:
    import gguf

    tokenizer = processor.tokenizer
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise MmllmError(f"gguf export handles byte-level BPE tokenizers, not {backend['model']['type']}")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token in (
        (writer.add_bos_token_id, tokenizer.bos_token),
        (writer.add_eos_token_id, tokenizer.eos_token),
        (writer.add_pad_token_id, tokenizer.pad_token),
    ):
        if token is not None and tokenizer.convert_tokens_to_ids(token) < vocab_size:
            setter(tokenizer.convert_tokens_to_ids(token))
    writer.add_add_bos_token(False)  # chat templates write their own BOS
    if processor.template:
        writer.add_chat_template(processor.template)


def export_gguf(model_name: str, out: str | Path, outtype: str = "f16", pre: str | None = None) -> Path:
    """Write `out` (a .gguf file, or a folder that receives `model.gguf`)."""
    import gguf

    from mmllm.models.build import load_model

    model, processor = load_model(model_name, dtype=torch.float32)
    model.merge_lora()
    lm = model.language_model
    config = lm.config
    arch_name = config.model_type
    if arch_name not in DEFAULT_PRE:
        raise MmllmError(f"gguf export supports {', '.join(DEFAULT_PRE)} language models, not {arch_name}")
    if outtype not in ("f16", "f32"):
        raise MmllmError("--outtype must be f16 or f32")
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[arch_name]
    path = Path(out)
    if path.suffix != ".gguf":
        path = path / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(str(model_name))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    _tokenizer_metadata(writer, processor, config.vocab_size, pre or DEFAULT_PRE[arch_name])

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in lm.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if arch_name == "llama" and name.endswith("q_proj.weight"):
            tensor = _permute(tensor, heads)
        elif arch_name == "llama" and name.endswith("k_proj.weight"):
            tensor = _permute(tensor, kv_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MmllmError(f"gguf export: no GGUF name for tensor {name}")
        # Norms and biases stay f32, as llama.cpp's converter keeps them.
        dtype = np.float16 if outtype == "f16" and tensor.ndim == 2 else np.float32
        writer.add_tensor(gguf_name, tensor.detach().numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (%s, %s)", path, arch_name, outtype)
    return path


def bytes_read_per_token(path: str | Path) -> int:
    """Weight bytes a llama.cpp decoding step reads from the GGUF at `path`: every tensor but the token
    embeddings, which are read in full only when they double as the output matrix (no `output.weight`)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    if "output.weight" in tensors:
        del tensors["token_embd.weight"]
    return sum(tensors.values())
