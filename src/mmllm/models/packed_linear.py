"""Linear layers over weights that oneDNN reorders once, for inference on CPUs.

`F.linear` on a CPU hands oneDNN a plain (N, K) weight, which it reorders into its blocked layout on
every call: a decoding step reads each weight twice and writes it once. Reordered at load instead
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing does), a 16-row step of
SmolLM2-135M's MLP takes 46 us instead of 68 us in bf16 and 102 us instead of 232 us in fp32; its
49,152-word output layer 1.6 ms instead of 2.6 ms (bf16). The results are oneDNN's matmul's either
way. A tied output layer keeps its embedding table (lookups read it) beside the packed copy.

Linears that read the same input (q, k, v; gate, up) become one matmul over their stacked weights
(`FusedLinears`): seven oneDNN calls a decoder layer become four.
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("mmllm")

BATCH_HINT = 16  # the rows oneDNN chooses its layout for: a decoding step's (a prompt's are many more)


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # linears that read the same input


class PackedLinear(torch.nn.Module):
    """`nn.Linear`'s forward (inference only) over its (N, K) weight in oneDNN's layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (..., K) -> (M, K)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN layout"


class FusedLinears(torch.nn.Module):
    """Linear layers that read the same input (attention's q, k and v; an MLP's gate and up) as one
    matmul over their stacked weights: transformers calls them one after another on the same tensor,
    so the first call computes every output and the others take their columns. An input other than
    the last one is computed anew, so the result never depends on the order of the calls.
    One call instead of three saves a oneDNN call and its threads' fork and join per layer."""

    def __init__(self, linears: list[torch.nn.Linear]):
        super().__init__()
        biases = [
            linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
            for linear in linears
        ]
        any_bias = any(linear.bias is not None for linear in linears)
        self.linear = PackedLinear(
            torch.cat([linear.weight for linear in linears]), torch.cat(biases) if any_bias else None
        )
        ends = torch.tensor([linear.out_features for linear in linears]).cumsum(0).tolist()
        self.columns = list(zip([0, *ends[:-1]], ends, strict=True))
        self.last = threading.local()  # per thread: two threads running the model never mix their outputs

    @property
    def output(self) -> torch.Tensor | None:
        """This thread's last output not yet taken by every part."""
        return getattr(self.last, "output", None)

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        last = self.last
        if getattr(last, "input", None) is not x:
            last.input, last.output, last.taken = x, self.linear(x), set()  # (..., N_1 + N_2 + ...)
        start, end = self.columns[index]
        output = last.output[..., start:end]
        last.taken.add(index)
        if len(last.taken) == len(self.columns):  # every part has its columns: hold no tensors
            last.input = last.output = None
        return output


class FusedPart(torch.nn.Module):
    """One linear of a `FusedLinears`: its columns of the shared output."""

    def __init__(self, fused: FusedLinears, index: int):
        super().__init__()
        self.fused, self.index = fused, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(self.index, x)


def pack_linears(model: torch.nn.Module) -> int:
    """Swap every plain fp32/bf16 `nn.Linear` of a CPU model for a `PackedLinear` (q/k/v and gate/up
    siblings for one `FusedLinears`); returns how many linears. Leaves the model as it is where this
    torch has no oneDNN (or no bf16 kernels for this CPU)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    dtypes = {torch.float32} | ({torch.bfloat16} if torch.ops.mkldnn._is_mkldnn_bf16_supported() else set())

    def plain(module: torch.nn.Module) -> bool:
        # Exact types: subclasses (LoRA layers) and quantised weights keep their own forward.
        return (
            type(module) is torch.nn.Linear
            and type(module.weight.data) is torch.Tensor  # not a quantised tensor subclass
            and module.weight.dtype in dtypes
            and module.weight.device.type == "cpu"
        )

    swapped = 0
    for parent in list(model.modules()):
        for names in FUSED:
            siblings = [getattr(parent, name, None) for name in names]
            if (
                all(plain(s) for s in siblings)
                and len({(s.in_features, s.weight.dtype) for s in siblings}) == 1
            ):
                fused = FusedLinears(siblings)
                for index, name in enumerate(names):
                    setattr(parent, name, FusedPart(fused, index))
                swapped += len(names)
        for name, child in list(parent.named_children()):
            if plain(child):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                swapped += 1
    log.debug("%d linear layers in oneDNN's layout", swapped)
    return swapped
