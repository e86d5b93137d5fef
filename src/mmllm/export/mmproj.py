"""The vision tower + projector as an mmproj GGUF: the file llama.cpp's multimodal library (mtmd, its
`clip` graphs) and Ollama read beside the language model's GGUF.

Written only where one of llama.cpp's graphs computes exactly our design: LLaVA's (CLIP patch features
from one layer, no CLS, Linear-GELU-Linear) as projector type `mlp`. Every other design is refused with
what llama.cpp lacks; those models still run in llama.cpp through `--backend llama.cpp`, which hands it
image rows computed by mmllm.

Read off llama.cpp's `tools/mtmd` (clip.cpp, models/llava.cpp) as vendored in llama-cpp-python 0.3.36:
- the graph runs blocks up to the deepest `clip.vision.feature_layer`; without that key it runs
  `block_count - 1` blocks, so the layer is always written (non-negative, HF's `hidden_states` index);
- the feature layer's output skips `post_ln` when no `post_ln` tensor exists: none is written, as HF's
  hidden states are taken before CLIP's post-layernorm;
- CLS is always dropped from the rows handed to the projector; the projector's GELU is ggml's tanh
  approximation where ours is exact (differences of ~1e-4 in the image rows);
- `ffn_up` is CLIP's `fc1` and `ffn_down` its `fc2` (their true names; the legacy script swapped them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mmllm.models.configuration import MultimodalConfig
from mmllm.models.timm_vision import TimmVisionConfig

log = logging.getLogger("mmllm")

WITHOUT_MMPROJ = "run it in llama.cpp with `--backend llama.cpp`, which hands llama.cpp mmllm's image rows"


def mmproj_refusal(config: MultimodalConfig) -> str | None:
    """Why llama.cpp's clip graphs cannot compute this design, or None when the `mlp` graph can."""
    if config.reads_images_as_words:
        return "the model reads images as words (the labels bridge): its prompt is text, no mmproj is needed"
    if isinstance(config.vision_config, TimmVisionConfig):
        return f"llama.cpp's clip has no graph for timm's {config.vision_config.architecture}"
    if config.vision_feature_mode != "patch":
        return (
            "llama.cpp's CLIP graphs hand patch rows to the projector; it has no graph for CLIP's pooled "
            "output through its projection head (vision_feature_mode=pooled)"
        )
    if config.vision_use_cls:
        return "llama.cpp's llava graph always drops the CLS row (vision_use_cls=true keeps it)"
    if config.vision_pixel_shuffle > 1:
        return (
            "llama.cpp's pixel-shuffle projectors are idefics3's (one bias-free Linear) and lfm2's (on "
            "SigLIP-2's graph, LayerNorm then Linear-GELU-Linear); neither is CLIP + this projector"
        )
    if config.projector_snap_to_vocab:
        return "llama.cpp has no step that replaces each image row by its nearest word embedding"
    if config.projector_type != "mlp_gelu":
        return (
            "llama.cpp's llava projectors are Linear-GELU-Linear (mlp) and Linear-LayerNorm-GELU-Linear-"
            "LayerNorm (mlp_norm); it has none for Linear-ReLU-LayerNorm-Linear (mlp_ln)"
        )
    return None


def _tensors(model, blocks: int) -> dict[str, torch.Tensor]:
    """llama.cpp's names for the first `blocks` CLIP blocks, the embeddings and the projector."""
    vision = getattr(model.vision_tower, "vision_model", model.vision_tower)  # transformers 5 flattened it
    embeddings = vision.embeddings
    tensors = {
        "v.class_embd": embeddings.class_embedding,
        "v.patch_embd.weight": embeddings.patch_embedding.weight,  # (D, 3, P, P)
        "v.position_embd.weight": embeddings.position_embedding.weight,  # (1 + P², D)
        "v.pre_ln.weight": vision.pre_layrnorm.weight,
        "v.pre_ln.bias": vision.pre_layrnorm.bias,
    }
    parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.out_proj": "attn_out",
        "layer_norm1": "ln1",
        "layer_norm2": "ln2",
        "mlp.fc1": "ffn_up",
        "mlp.fc2": "ffn_down",
    }
    for index, layer in enumerate(vision.encoder.layers[:blocks]):
        for ours, theirs in parts.items():
            module = layer.get_submodule(ours)
            for kind in ("weight", "bias"):
                tensors[f"v.blk.{index}.{theirs}.{kind}"] = getattr(module, kind)
    first, second = model.projector.linears
    for index, linear in ((0, first), (2, second)):  # llama.cpp's mm.N follow LLaVA's Sequential
        tensors[f"mm.{index}.weight"] = linear.weight
        tensors[f"mm.{index}.bias"] = linear.bias
    return tensors


def write_mmproj(model, processor, path: Path, outtype: str = "f16") -> None:
    """Write the mmproj GGUF of a model whose design `mmproj_refusal` accepts."""
    import gguf

    config, vision = model.config, model.vision_tower.config
    layers = vision.num_hidden_layers
    feature_layer = config.vision_feature_layer % (layers + 1)  # HF's hidden_states index, made >= 0
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"{config.text_model_name_or_path or 'mmllm'} vision")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", vision.hidden_act == "gelu")  # else CLIP's quick GELU
    writer.add_uint32("clip.vision.image_size", vision.image_size)
    writer.add_uint32("clip.vision.patch_size", vision.patch_size)
    writer.add_uint32("clip.vision.embedding_length", vision.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", vision.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", model.language_model.config.hidden_size)
    writer.add_uint32("clip.vision.attention.head_count", vision.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.layer_norm_eps)
    writer.add_uint32("clip.vision.block_count", feature_layer)
    writer.add_array("clip.vision.feature_layer", [feature_layer])
    writer.add_array("clip.vision.image_mean", [float(m) for m in processor.image_processor.mean])
    writer.add_array("clip.vision.image_std", [float(s) for s in processor.image_processor.std])
    for name, tensor in _tensors(model, feature_layer).items():
        # Matrices and the patch kernel in f16 as llama.cpp's converters write them; norms, biases and
        # the embeddings in f32.
        half = outtype == "f16" and tensor.ndim in (2, 4) and "position_embd" not in name
        writer.add_tensor(name, tensor.detach().float().numpy().astype(np.float16 if half else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (llama.cpp mmproj, projector type mlp, %d blocks)", path, feature_layer)
