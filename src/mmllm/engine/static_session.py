"""Fast decoding for the torch backend: a running batch over a static KV cache, its forward passes
compiled once per shape bucket (`torch.compile`; CUDA graphs on a GPU).

Eager decoding of a 0.5B model spends most of each token launching kernels from Python (an H100
decoded Qwen2.5-0.5B at ~45 ms a token, where reading its weights takes about 1 ms). A CUDA graph
replays a whole forward pass as one launch, but only over fixed shapes and fixed memory, so this
session keeps its KV cache in buffers allocated once, (S, H, L, d) a layer: a slot per row, each row
writing at its own positions. Shapes come in buckets: a decoding step runs over the first B slots (B
a power of two), prompt chunks are padded to a few lengths, and attention reads the first W columns
(W a few widths up to L); each bucket compiles once and is replayed afterwards. Rows that are not
decoding ride along in a step, writing into their slot's last column, which they overwrite before
they attend to it (their outputs are dropped).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mmllm.engine.backend import Prompt
from mmllm.engine.prefix_cache import PrefixCache
from mmllm.engine.running import read_each
from mmllm.models.language import cache_keyword
from mmllm.models.multimodal import MultimodalLM

STATIC_CONTEXT = 4096  # tokens a slot holds (prompt + answer): the cache is allocated whole
SLOTS = 16
CHUNKS = (16, 32, 64, 128, 256)  # prompt chunk lengths (pad at most 2x); longer prompts: 256 at a time
FIRST_WIDTH, WIDTH_GROWTH = 256, 4


def buckets(first: int, growth: int, last: int) -> tuple[int, ...]:
    """first, first * growth, ... below `last`, then `last`."""
    sizes = []
    while first < last:
        sizes.append(first)
        first *= growth
    return (*sizes, last)


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    return next(size for size in sizes if size >= n)


def kv_bytes(keys: list[torch.Tensor]) -> int:
    """The bytes one token takes in all layers' keys and values, from their (..., H, L, d) keys."""
    return sum(2 * layer.shape[-3] * layer.shape[-1] * layer.element_size() for layer in keys)


def row_columns(
    keys: list[torch.Tensor], values: list[torch.Tensor], row: int, columns: slice
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A copy of one row's `columns` of every layer's (B, H, L, d) keys and values: a prefix cache
    entry, (H, C, d) a layer (copied: the batch's buffers are reused or cut)."""
    return [k[row, :, columns].clone() for k in keys], [v[row, :, columns].clone() for v in values]


class SlotCache:
    """Per layer, keys and values of every slot: (S, H, L, d) buffers at fixed addresses.

    It stands where transformers expects a `Cache`: attention calls `update` with a layer's new keys
    and values; the session sets, before each pass, which slots the rows are (`rows`, or the first B
    slots in order where `rows` is None), where they write (`positions`) and how many columns attention
    reads (`width`).
    """

    is_compileable = True

    def __init__(self, layers: int, slots: int, heads: int, length: int, head_dim: int, **tensor_kw):
        shape = (slots, heads, length, head_dim)
        # Zeros, not empty memory: a masked column still multiplies its value by a zero weight.
        self.keys = [torch.zeros(shape, **tensor_kw) for _ in range(layers)]
        self.values = [torch.zeros(shape, **tensor_kw) for _ in range(layers)]
        for buffer in self.keys + self.values:
            torch._dynamo.mark_static_address(buffer)
        self.rows: torch.Tensor | None = None  # (B,) slots, or None: the first B
        self.positions = torch.zeros(0, 0, dtype=torch.long)  # (B, C)
        self.width = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]  # (S, H, L, d)
        batch = key_states.shape[0]
        rows = self.rows if self.rows is not None else torch.arange(batch, device=keys.device)
        keys[rows[:, None], :, self.positions] = key_states.transpose(1, 2)  # (B, C, H, d) written
        values[rows[:, None], :, self.positions] = value_states.transpose(1, 2)
        keys, values = keys[:, :, : self.width], values[:, :, : self.width]  # (S, H, W, d) views
        if self.rows is None:
            return keys[:batch], values[:batch]  # views: no copy
        return keys.index_select(0, rows), values.index_select(0, rows)


class StaticSession:
    """Rows decoding together over a `SlotCache`, each pass a compiled (bucketed) graph: the torch
    backend's running batch with `--compile on` (the default on CUDA).

    `embed_prompt`: a prompt -> its (1, P, D) LM input embeddings, image rows in (the backend's).
    `compiler` is `torch.compile`'s backend ("inductor"; tests trace with "eager" or a counting one);
    None runs the same static passes uncompiled.
    """

    def __init__(
        self,
        model: MultimodalLM,
        embed_prompt: Callable[[Prompt], torch.Tensor],
        slots: int = SLOTS,
        context: int = STATIC_CONTEXT,
        compiler: str | Callable | None = "inductor",
    ):
        self.model, self.embed_prompt = model, embed_prompt
        self.lm = self.model.language_model
        config = self.model.config.text_config
        self.context = min(context, config.max_position_embeddings)
        self.max_rows, self.kv_tokens = slots, None
        self.batch_sizes = tuple(sorted({*(2**k for k in range(slots.bit_length()) if 2**k < slots), slots}))
        self.widths = buckets(FIRST_WIDTH, WIDTH_GROWTH, self.context)
        self.chunks = tuple(size for size in CHUNKS if size < self.context) or (self.context,)
        self.cache_argument = cache_keyword(self.lm)
        self.kv: SlotCache | None = None  # allocated at the first row
        self.prompts: dict[int, torch.Tensor] = {}  # handle -> (1, P, D) prompt embeddings
        self.slot_of: dict[int, int] = {}
        self.next_position: dict[int, int] = {}
        self.issued = 0
        self.prefix_cache = PrefixCache()
        self.decode_pass, self.prefill_pass = self._decode, self._prefill
        if compiler is not None:
            cuda = self.model.device.type == "cuda"
            options = {
                "backend": compiler,
                "dynamic": False,
                "fullgraph": True,
                "mode": "reduce-overhead" if cuda else None,
            }
            if compiler != "inductor":
                options.pop("mode")
            # Every bucket is its own graph: let dynamo keep them all instead of falling back to eager
            # (the limit counts graphs per function, so it holds for one session a process).
            graphs = len(self.widths) * max(len(self.batch_sizes), len(self.chunks))
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
            self.decode_pass = torch.compile(self._decode, **options)
            self.prefill_pass = torch.compile(self._prefill, **options)

    def _allocate(self) -> SlotCache:
        config = self.model.config.text_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        layers = config.num_hidden_layers
        parameter = next(self.lm.parameters())
        return SlotCache(
            layers,
            self.max_rows,
            heads,
            self.context,
            head_dim,
            dtype=parameter.dtype,
            device=parameter.device,
        )

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, rows, width: int, keep) -> torch.Tensor:
        """(B, C, D) embeddings at (B, C) positions -> logits at `keep`; row b attends to its slot's
        columns up to its own position."""
        columns = torch.arange(width, device=positions.device)
        allowed = columns <= positions[..., None]  # (B, C, W)
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]  # (B, 1, C, W)
        self.kv.rows, self.kv.positions, self.kv.width = rows, positions, width
        output = self.lm(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=mask,  # 4D: transformers takes it as prepared
            use_cache=True,
            logits_to_keep=keep,
            **{self.cache_argument: self.kv},
        )
        return output.logits

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """(B,) tokens of the first B slots at (B,) positions -> (B, V) logits."""
        embeds = self.model.get_input_embeddings()(tokens[:, None])  # (B, 1, D)
        return self._forward(embeds, positions[:, None], None, width, 1)[:, -1]

    def _prefill(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slot: torch.Tensor,
        last: torch.Tensor,
        width: int,
    ):
        """A prompt chunk, (1, C, D) at (1, C) positions, into `slot` -> (V,) logits at index `last`."""
        return self._forward(embeds, positions, slot, width, last)[0, -1]

    def _new_step(self) -> None:
        """Tell the CUDA graphs that the previous pass's outputs are spent: a replay may overwrite them
        (without it, a graph's outputs still referenced make the next replay record anew)."""
        if self.model.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    @property
    def rows_held(self) -> int:
        return len(self.slot_of)

    @torch.inference_mode()
    def start(self, prompt: Prompt) -> tuple[int, int]:
        if self.kv is None:
            self.kv = self._allocate()
        embeds = self.embed_prompt(prompt)
        free = sorted(set(range(self.max_rows)) - set(self.slot_of.values()))
        if not free:
            raise RuntimeError(f"all {self.max_rows} rows of the static cache are taken")
        self.issued += 1
        kept, length = self.prefix_cache.begin(self.issued, prompt, self.model.config.image_token_id)
        if kept:
            for buffer, tensor in zip(self.kv.keys + self.kv.values, kept[0] + kept[1], strict=True):
                buffer[free[0], :, :length] = tensor[:, :length]  # in place: the graphs read these addresses
        self.prompts[self.issued], self.slot_of[self.issued] = embeds, free[0]
        self.next_position[self.issued] = length
        return self.issued, length

    def read(self, chunks: list[tuple[int, int]]) -> list[np.ndarray | Exception | None]:
        return read_each(self._read, chunks)

    @torch.inference_mode()
    def _read(self, handle: int, end: int) -> np.ndarray | None:
        embeds, device = self.prompts[handle], self.model.device
        slot = torch.tensor([self.slot_of[handle]], device=device)
        logits = None
        while (start := self.next_position[handle]) < end:
            length = min(end - start, self.chunks[-1])
            size = bucket(length, self.chunks)
            chunk = F.pad(embeds[:, start : start + length], (0, 0, 0, size - length))  # (1, C, D)
            # Padding writes past the prompt's end, columns the row overwrites before it reads them.
            positions = (start + torch.arange(size, device=device)).clamp(max=self.context - 1)[None]
            last = torch.tensor([length - 1], device=device)
            width = bucket(start + length, self.widths)
            self._new_step()
            logits = self.prefill_pass(chunk, positions, slot, last, width)
            self.next_position[handle] = start + length
        if end < embeds.shape[1]:
            return None
        del self.prompts[handle]
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def step(self, handles: list[int], tokens: list[int]) -> np.ndarray:
        if set(handles) != set(self.slot_of) - set(self.prompts):
            raise ValueError("a step appends a token to every row whose prompt is read")
        device = self.model.device
        batch = bucket(max(self.slot_of.values()) + 1, self.batch_sizes)
        slots = [self.slot_of[handle] for handle in handles]
        batch_tokens = torch.zeros(batch, dtype=torch.long)
        # Rows outside the step (free, or still reading) write into the last column, which no row has
        # reached: whatever lands there is overwritten before anyone attends to it.
        batch_positions = torch.full((batch,), self.context - 1, dtype=torch.long)
        batch_tokens[slots] = torch.tensor(tokens)
        batch_positions[slots] = torch.tensor([self.next_position[handle] for handle in handles])
        width = bucket(int(batch_positions[slots].max()) + 1, self.widths)
        self._new_step()
        logits = self.decode_pass(batch_tokens.to(device), batch_positions.to(device), width)  # (B, V)
        for handle in handles:
            self.next_position[handle] += 1
        self.prefix_cache.append(handles, tokens)
        return logits[slots].float().cpu().numpy()

    def stop(self, handle: int) -> None:
        slot, length = self.slot_of.pop(handle, None), self.next_position.pop(handle, 0)
        if self.prompts.pop(handle, None) is not None or slot is None:
            self.prefix_cache.forget(handle)
            return
        # A row at the context's end wrote its last column, where rows outside a step write too.
        length = min(length, self.context - 1)
        keys, values = self.kv.keys, self.kv.values
        kept = functools.partial(row_columns, keys, values, slot, slice(0, length))
        self.prefix_cache.end(handle, length, kv_bytes(keys), kept)
