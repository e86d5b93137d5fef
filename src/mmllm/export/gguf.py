"""`mmllm export gguf`: a folder for llama.cpp, Ollama and `--backend llama.cpp`.

- `model-f16.gguf`, `model-q8_0.gguf`, `model-q4_k_m.gguf`: the (LoRA-merged) language model, written
  with the `gguf` package's writer and tensor-name map for the architectures we ship (qwen2: Qwen2.5;
  llama: SmolLM2, Llama), the byte-level BPE tokenizer as llama.cpp's `gpt2` model with its merges and
  chat template; the quantised files made from the f16 one by llama.cpp's own quantiser;
- `mmproj-f16.gguf` (f32 when only f32 is asked for): the vision tower + projector for llama.cpp's
  mtmd and Ollama, where llama.cpp can express the design (`mmllm.export.mmproj`; otherwise the reason
  is logged and recorded);
- `vision.onnx`, the processor and `mmllm_llamacpp.json`: what `--backend llama.cpp` reads, so every
  design runs in llama.cpp, its image rows computed by mmllm's one projection path;
- `Modelfile`: `ollama create NAME -f Modelfile` imports the LM and the mmproj.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from mmllm.engine.llama_cpp import (
    LLAMA_CPP_CONFIG,
    LLAMA_CPP_FORMAT,
    PREFERRED,
    import_llama_cpp,
    quiet_llama_cpp,
)
from mmllm.errors import MmllmError

log = logging.getLogger("mmllm")

# llama.cpp pre-tokenizer names: how text is split before BPE (its `tokenizer.ggml.pre`).
DEFAULT_PRE = {"qwen2": "qwen2", "llama": "llama-bpe"}
QUANTISED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
GGUF_TYPES = ("f32", "f16", *QUANTISED)


def _permute(weight, heads: int):
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


def write_lm_gguf(model, processor, path: Path, outtype: str, name: str, pre: str | None = None) -> None:
    """Write the language model (LoRA merged) as an f16 or f32 GGUF at `path`."""
    import gguf

    lm = model.language_model
    config = lm.config
    arch_name = config.model_type
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[arch_name]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
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
    for tensor_name, tensor in lm.state_dict().items():
        if tied and tensor_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if arch_name == "llama" and tensor_name.endswith("q_proj.weight"):
            tensor = _permute(tensor, heads)
        elif arch_name == "llama" and tensor_name.endswith("k_proj.weight"):
            tensor = _permute(tensor, kv_heads)
        gguf_name = names.get_name(tensor_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MmllmError(f"gguf export: no GGUF name for tensor {tensor_name}")
        # Norms and biases stay f32, as llama.cpp's converter keeps them.
        dtype = np.float16 if outtype == "f16" and tensor.ndim == 2 else np.float32
        writer.add_tensor(gguf_name, tensor.detach().float().numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(source: Path, target: Path, kind: str) -> None:
    """llama.cpp's own quantiser (what `llama-quantize` runs), through llama-cpp-python."""
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTISED[kind])
    quiet_llama_cpp()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise MmllmError(f"llama.cpp could not quantise {source.name} to {kind}")


def lm_file(folder: Path, kind: str) -> Path:
    return folder / f"model-{kind}.gguf"


def default_types() -> list[str]:
    """f16, and llama.cpp's q8_0 and q4_k_m where llama-cpp-python (its quantiser) is installed."""
    try:
        import_llama_cpp()
    except MmllmError:
        log.info(
            "gguf: f16 only; q8_0 and q4_k_m need llama-cpp-python: make install-llamacpp in mmllm's checkout"
        )
        return ["f16"]
    return ["f16", "q8_0", "q4_k_m"]


def export_gguf(
    model_name: str, out: str | Path, outtypes: list[str] | None = None, pre: str | None = None
) -> Path:
    """Write the folder `out` (see the module's docstring); returns it."""
    import torch

    from mmllm.export.mmproj import WITHOUT_MMPROJ, mmproj_refusal, write_mmproj
    from mmllm.export.onnx import export_vision
    from mmllm.models.build import load_model

    outtypes = outtypes or default_types()
    if unknown := [t for t in outtypes if t not in GGUF_TYPES]:
        raise MmllmError(f"unknown gguf type {', '.join(unknown)}; choose from {', '.join(GGUF_TYPES)}")
    model, processor = load_model(model_name, dtype=torch.float32)
    arch_name = model.language_model.config.model_type
    if arch_name not in DEFAULT_PRE:
        raise MmllmError(f"gguf export supports {', '.join(DEFAULT_PRE)} language models, not {arch_name}")
    model.merge_lora()
    model.eval()
    out = Path(out)
    if out.suffix == ".gguf":
        raise MmllmError(f"gguf export writes a folder (the LM, its mmproj, a Modelfile), not {out.name}")
    out.mkdir(parents=True, exist_ok=True)
    float_types = [t for t in outtypes if t in ("f32", "f16")]
    source = "f16" if "f16" in outtypes or not float_types else float_types[0]
    write_lm_gguf(model, processor, lm_file(out, source), source, str(model_name), pre)
    for kind in outtypes:
        if kind in QUANTISED:
            quantize(lm_file(out, source), lm_file(out, kind), kind)
        elif kind != source:
            write_lm_gguf(model, processor, lm_file(out, kind), kind, str(model_name), pre)
    if source not in outtypes:
        lm_file(out, source).unlink()

    refusal = mmproj_refusal(model)
    mmproj = f"mmproj-{source}.gguf"
    if refusal is None:
        write_mmproj(model, processor, out / mmproj, source)
    else:
        log.warning("gguf: no mmproj for llama.cpp's mtmd or Ollama: %s; %s", refusal, WITHOUT_MMPROJ)
    settings = {
        "format": LLAMA_CPP_FORMAT,
        **export_vision(model, processor, out),
        "gguf": {kind: lm_file(out, kind).name for kind in outtypes},
        "mmproj": mmproj if refusal is None else None,
        "mmproj_refusal": refusal,
    }
    (out / LLAMA_CPP_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    write_modelfile(out, outtypes, settings["mmproj"], processor)
    log.info("wrote %s (%s)", out, ", ".join([*settings["gguf"].values(), settings["mmproj"] or "no mmproj"]))
    return out


def write_modelfile(out: Path, outtypes: list[str], mmproj: str | None, processor) -> None:
    """Ollama's recipe: the smallest LM file, then the mmproj, greedy, stopping where mmllm stops."""
    smallest = next(kind for kind in PREFERRED if kind in outtypes)
    lines = [f"FROM ./{lm_file(out, smallest).name}"]
    if mmproj:
        lines.append(f"FROM ./{mmproj}")
    lines.append("PARAMETER temperature 0")
    tokenizer = processor.tokenizer
    for token in sorted({tokenizer.convert_ids_to_tokens(i) for i in processor.stop_token_ids}):
        lines.append(f'PARAMETER stop "{token}"')
    (out / "Modelfile").write_text("\n".join(lines) + "\n")


def bytes_read_per_token(path: str | Path) -> int:
    """Weight bytes a llama.cpp decoding step reads from the GGUF at `path`: every tensor but the token
    embeddings, which are read in full only when they double as the output matrix (no `output.weight`)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    if "output.weight" in tensors:
        del tensors["token_embd.weight"]
    return sum(tensors.values())
