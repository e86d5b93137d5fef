"""The vision tower + projector as an mmproj GGUF: the file llama.cpp's multimodal library (mtmd, its
`clip` graphs) and Ollama read beside the language model's GGUF.

Written only where one of llama.cpp's graphs computes exactly our design: a ViT without a CLS token
(timm's SigLIP-style ViTs, `vit_*_siglip_*`, `vit_*_gap_*`) giving patch features from one block, and
LLaVA's Linear-GELU-Linear projector (`mlp_gelu`), as llama.cpp's projector type `mlp`. Every other
design is refused with what llama.cpp lacks; those models still run in llama.cpp through
`--backend llama.cpp`, which hands it image rows computed by mmllm.

Read off llama.cpp's `tools/mtmd` (clip.cpp, models/llava.cpp) as vendored in llama-cpp-python 0.3.36,
and checked against it in `tests/test_llama_cpp.py`:
- the llava graph appends a CLS token *after* the patches, adds position rows 0..N in that order and
  hands rows 1..N to the projector: for CLIP the first patch is lost, CLS is kept and every patch gets
  its left neighbour's position (measured: cosine 0.0007-0.60 against CLIP's rows). Without a CLS
  tensor it takes the patches in order, at their own positions: exact;
- it runs blocks up to the deepest `clip.vision.feature_layer`; without that key it runs
  `block_count - 1` blocks, so the layer is always written (the number of blocks run);
- the feature layer's output skips `post_ln` when no `post_ln` tensor exists: none is written, as the
  features are a block's output before any final norm;
- the GELUs are ggml's tanh approximation where ours are exact (differences of ~1e-4 in the rows);
- `ffn_up` is the MLP's first Linear and `ffn_down` its second (their true names; llama.cpp's legacy
  script swapped them and its loader swaps back by shape).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mmllm.models.timm_vision import TimmVisionConfig

log = logging.getLogger("mmllm")

WITHOUT_MMPROJ = "run it with `--backend llama.cpp`: mmllm computes what the LM reads of each image"


def _plain_vit_refusal(tower) -> str | None:
    """Why a timm tower is not a ViT that llama.cpp's llava graph computes exactly, or None."""
    vit = tower.model
    name = tower.config.architecture
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed") or not hasattr(vit, "pos_embed"):
        return f"llama.cpp's clip has no graph for timm's {name} (only plain ViTs map onto its llava graph)"
    if vit.num_prefix_tokens:
        return (
            f"{name} has {vit.num_prefix_tokens} CLS/register tokens: llama.cpp's llava graph misplaces them"
        )
    extras = [(block, ("ls1", "ls2")) for block in vit.blocks]
    extras += [(block.attn, ("q_norm", "k_norm", "norm")) for block in vit.blocks]
    extras += [(block.mlp, ("norm",)) for block in vit.blocks] + [(vit.patch_embed, ("norm",))]
    plain = all(
        isinstance(getattr(module, name, torch.nn.Identity()), torch.nn.Identity)
        for module, names in extras
        for name in names
    ) and hasattr(vit.blocks[0].attn, "qkv")
    if not plain:
        return f"{name} uses layer scale or extra norms, which llama.cpp's llava graph does not have"
    return None


def mmproj_refusal(model) -> str | None:
    """Why llama.cpp's clip graphs cannot compute this model's design exactly, or None when its llava
    graph (projector type `mlp`) can."""
    config = model.config
    if config.reads_images_as_words:
        return "the model reads images as words (the labels bridge): its prompt is text, no mmproj is needed"
    if config.vision_feature_mode != "patch":
        return (
            "llama.cpp's vision graphs hand patch rows to the projector; it has no graph for pooled "
            "features (vision_feature_mode=pooled) or class probabilities"
        )
    if config.vision_pixel_shuffle > 1:
        return (
            "llama.cpp's pixel-shuffle projectors are idefics3's (one bias-free Linear) and lfm2's (on "
            "SigLIP-2's graph, LayerNorm then Linear-GELU-Linear); neither is this tower + projector"
        )
    if config.projector_snap_to_vocab:
        return "llama.cpp has no step that replaces each image row by its nearest word embedding"
    if config.projector_type != "mlp_gelu":
        return (
            "llama.cpp's llava projectors are Linear-GELU-Linear (mlp) and Linear-LayerNorm-GELU-Linear-"
            "LayerNorm (mlp_norm); it has none for Linear-ReLU-LayerNorm-Linear (mlp_ln)"
        )
    if not isinstance(config.vision_config, TimmVisionConfig):
        return (
            "llama.cpp's llava graph (llama-cpp-python 0.3.36) puts CLIP's CLS token after the patches, "
            "shifts every patch's position by one and drops the first patch; a CLS-free ViT (timm's "
            "vit_*_siglip_*) exports exactly"
        )
    return _plain_vit_refusal(model.vision_tower)


def _tensors(vit, blocks: int, projector) -> dict[str, torch.Tensor]:
    """llama.cpp's names for the patch embedding, the first `blocks` ViT blocks and the projector."""
    tensors = {
        "v.patch_embd.weight": vit.patch_embed.proj.weight,  # (D, 3, P, P)
        "v.patch_embd.bias": vit.patch_embed.proj.bias,
        "v.position_embd.weight": vit.pos_embed[0],  # (P², D)
    }
    if not isinstance(vit.norm_pre, torch.nn.Identity):
        tensors |= {"v.pre_ln.weight": vit.norm_pre.weight, "v.pre_ln.bias": vit.norm_pre.bias}
    for index, block in enumerate(vit.blocks[:blocks]):
        # timm fuses q, k and v into one Linear; the llava graph reads them apart.
        for kind in ("weight", "bias"):
            q, k, v = getattr(block.attn.qkv, kind).chunk(3)
            parts = {
                "attn_q": q,
                "attn_k": k,
                "attn_v": v,
                "attn_out": getattr(block.attn.proj, kind),
                "ln1": getattr(block.norm1, kind),
                "ln2": getattr(block.norm2, kind),
                "ffn_up": getattr(block.mlp.fc1, kind),
                "ffn_down": getattr(block.mlp.fc2, kind),
            }
            tensors |= {f"v.blk.{index}.{part}.{kind}": tensor for part, tensor in parts.items()}
    first, second = projector.linears
    for index, linear in ((0, first), (2, second)):  # llama.cpp's mm.N follow LLaVA's Sequential
        tensors[f"mm.{index}.weight"] = linear.weight
        tensors[f"mm.{index}.bias"] = linear.bias
    return tensors


def write_mmproj(model, processor, path: Path, outtype: str = "f16") -> None:
    """Write the mmproj GGUF of a model whose design `mmproj_refusal` accepts."""
    import gguf

    config, vit = model.config, model.vision_tower.model
    blocks = config.vision_feature_layer % (len(vit.blocks) + 1) + 1  # a block's output: blocks run
    first = vit.blocks[0]
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"{config.vision_config.architecture} + mlp_gelu (mmllm)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", processor.image_processor.size)
    writer.add_uint32("clip.vision.patch_size", vit.patch_embed.proj.kernel_size[0])
    writer.add_uint32("clip.vision.embedding_length", vit.embed_dim)
    writer.add_uint32("clip.vision.feed_forward_length", first.mlp.fc1.out_features)
    writer.add_uint32("clip.vision.projection_dim", model.language_model.config.hidden_size)
    writer.add_uint32("clip.vision.attention.head_count", first.attn.num_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", first.norm1.eps)
    writer.add_uint32("clip.vision.block_count", blocks)
    writer.add_array("clip.vision.feature_layer", [blocks])
    writer.add_array("clip.vision.image_mean", [float(m) for m in processor.image_processor.mean])
    writer.add_array("clip.vision.image_std", [float(s) for s in processor.image_processor.std])
    for name, tensor in _tensors(vit, blocks, model.projector).items():
        # Matrices and the patch kernel in f16 as llama.cpp's converters write them; norms, biases and
        # position rows in f32.
        half = outtype == "f16" and tensor.ndim in (2, 4) and "position_embd" not in name
        writer.add_tensor(name, tensor.detach().float().numpy().astype(np.float16 if half else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (llama.cpp mmproj, projector type mlp, %d blocks)", path, blocks)
