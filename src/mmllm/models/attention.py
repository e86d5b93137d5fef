"""Attention for decoding on CPUs: one new query a row, each KV head shared by a group of query heads.

PyTorch's CPU SDPA kernel spends ~0.75 ms a layer on a padded (16, 9, 1, 90) decoding query
(SmolLM2-135M, 16 rows), half of the whole step; transformers' eager attention copies every KV head
across its group (`repeat_kv`) each layer. Here a group's queries meet their shared keys through a
reshape, (B, H_kv, G, d) x (B, H_kv, d, L), with no copies: a 16-row SmolLM2-135M step in bf16 on two
cores goes from 52 to 31 ms. Prompt chunks (many queries a row) still take SDPA's flash kernel, which
suits them and never holds a (Q, L) score matrix.

`use_grouped_attention(lm)` switches a loaded LM to it; the masks stay transformers' own (eager's
additive ones), so padding, holes and causality mean what they mean everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

GROUPED = "mmllm_grouped"


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """(B, H, Q, d) queries over (B, H_kv, L, d) keys and values, an additive (B, 1, Q, L) mask ->
    (B, Q, H, d), as transformers' attention functions return."""
    batch, heads, queries, dim = query.shape
    if queries > 1 or dropout:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return output.transpose(1, 2), None
    kv_heads, length = key.shape[1], key.shape[2]
    rows = batch * kv_heads  # one (L, d) block of keys each, shared by G = H / H_kv query heads
    # Keys x queries, not queries x keys^T: bmm reads the keys' rows where they lie (views of a cache
    # with spare columns), where their transpose would be copied first, every layer.
    keys = key.reshape(rows, length, dim)  # (B·H_kv, L, d)
    grouped = query.reshape(rows, heads // kv_heads, dim).transpose(1, 2)  # (B·H_kv, d, G): repeat_kv's order
    scale = scaling or dim**-0.5
    if attention_mask is None:
        scores = torch.bmm(keys, grouped) * scale
    else:  # scale and mask in the same call: (B, 1, 1, L) -> (B·H_kv, L, 1)
        mask = attention_mask.reshape(batch, 1, length, 1).expand(batch, kv_heads, length, 1)
        scores = torch.baddbmm(mask.reshape(rows, length, 1), keys, grouped, alpha=scale)  # (B·H_kv, L, G)
    weights = torch.softmax(scores, 1, dtype=torch.float32).to(value.dtype)
    output = torch.bmm(weights.transpose(1, 2), value.reshape(rows, length, dim))  # (B·H_kv, G, d)
    return output.view(batch, 1, heads, dim), None


AttentionInterface.register(GROUPED, grouped_attention)
AttentionMaskInterface.register(GROUPED, eager_mask)


def use_grouped_attention(lm: PreTrainedModel) -> None:
    """Decode `lm` with `grouped_attention` (for CPUs; on a GPU SDPA's kernels are the fast ones)."""
    lm.set_attn_implementation(GROUPED)
