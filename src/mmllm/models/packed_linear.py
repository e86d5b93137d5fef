"""Linear layers over weights that oneDNN reorders once, for inference on CPUs.

`F.linear` on a CPU hands oneDNN a plain (N, K) weight, which it reorders into its blocked layout on
every call: a decoding step reads each weight twice and writes it once. Reordered at load instead
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing does), a 16-row step of
SmolLM2-135M's MLP takes 46 us instead of 68 us in bf16 and 102 us instead of 232 us in fp32; its
49,152-word output layer 1.6 ms instead of 2.6 ms (bf16). The results are oneDNN's matmul's either
way. A tied output layer keeps its embedding table (lookups read it) beside the packed copy.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("mmllm")

BATCH_HINT = 16  # the rows oneDNN chooses its layout for: a decoding step's (a prompt's are many more)


class PackedLinear(torch.nn.Module):
    """`nn.Linear`'s forward (inference only) over its weight in oneDNN's layout."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (..., K) -> (M, K)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN layout"


def pack_linears(model: torch.nn.Module) -> int:
    """Swap every plain fp32/bf16 `nn.Linear` of a CPU model for a `PackedLinear`; returns how many.
    Leaves the model as it is where this torch has no oneDNN (or no bf16 kernels for this CPU)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    dtypes = {torch.float32} | ({torch.bfloat16} if torch.ops.mkldnn._is_mkldnn_bf16_supported() else set())
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # Exact types: subclasses (LoRA layers) and quantised weights keep their own forward.
            if (
                type(child) is torch.nn.Linear
                and type(child.weight.data) is torch.Tensor  # not a quantised tensor subclass
                and child.weight.dtype in dtypes
                and child.weight.device.type == "cpu"
            ):
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    log.debug("%d linear layers in oneDNN's layout", swapped)
    return swapped
