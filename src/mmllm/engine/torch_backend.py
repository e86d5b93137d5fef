"""The PyTorch backend (`Pipeline`, what `--backend torch` runs): a `MultimodalLM` answering through
its running batch, eager over a dynamic cache (`TorchSession`) or compiled over a static one
(`static_session.StaticSession`); beam search through transformers' `generate`."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from mmllm.engine.backend import Backend, Prompt
from mmllm.engine.prefix_cache import PrefixCache
from mmllm.engine.rows import RowTracker
from mmllm.engine.running import decode_all
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.static_session import StaticSession, kv_bytes, row_columns
from mmllm.errors import MmllmError
from mmllm.images import ImageInput
from mmllm.models.attention import use_grouped_attention
from mmllm.models.build import load_model, untrained_parts
from mmllm.models.language import cache_keyword
from mmllm.models.multimodal import MultimodalLM
from mmllm.models.packed_linear import pack_linears
from mmllm.processor import MultimodalProcessor

log = logging.getLogger("mmllm")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_CHOICES = ("auto", "on", "off")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_for_cpu_decoding(model: MultimodalLM) -> MultimodalLM:
    """What `Pipeline.load` does to a model it decodes eagerly on a CPU: grouped-query attention and
    linear layers in oneDNN's layout. In place, for inference only: the model no longer trains,
    exports or compiles."""
    use_grouped_attention(model.language_model)
    pack_linears(model)
    return model


def pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """`tensor` with `columns` zero columns put before dimension `dim`'s first."""
    if not columns:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


class SlackLayer(DynamicLayer):
    """A `DynamicLayer` that grows into spare columns: a decoding step writes its one column in place
    instead of copying the whole cache (`torch.cat`) every token, every layer.

    `keys` and `values` are views of the first columns of (B, H, capacity, d) buffers; keys set to any
    other tensor (a batch joined or cut) move into new buffers at the next `update`."""

    slack = 64  # spare columns a new buffer gets: a copy every 64 steps instead of every step
    room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        end = length + key_states.shape[-2]
        room = self.room
        if (
            room is None
            or room[0].data_ptr() != self.keys.data_ptr()
            or room[0].shape[:2] != key_states.shape[:2]
            or room[0].shape[2] < end
        ):
            shape = (*key_states.shape[:2], end + self.slack, key_states.shape[-1])
            room = self.room = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                room[0][:, :, :length], room[1][:, :, :length] = self.keys, self.values
        room[0][:, :, length:end], room[1][:, :, length:end] = key_states, value_states
        self.keys, self.values = room[0][:, :, :end], room[1][:, :, :end]
        return self.keys, self.values


def slack_cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Cache:
    """A KV cache of `SlackLayer`s, holding `layers`' (B, H, L, d) keys and values where given."""
    if not layers:
        return Cache(layer_class_to_replicate=SlackLayer)
    cache = Cache(layers=[SlackLayer() for _ in layers])
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        layer.update(keys, values)
    return cache


@dataclass
class Reading:
    """A row still reading its prompt."""

    prompt: Prompt
    length: int = 0  # prompt tokens read (or taken from the prefix cache): C
    # the keys and values of those tokens, (1, H, C, d) a layer; None before it has any
    past: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    embeds: torch.Tensor | None = None  # (1, P, D), made at its first read (its images with others')


class TorchSession:
    """Rows decoding together over one left-padded KV cache (`SlackLayer`s of (B, H, L, d)).

    Rows that read in the same step read together: their images go through the vision tower in one
    pass, and their prompt chunks through the LM in one padded pass, each row at its own positions
    (its past right-aligned in the first columns, its chunk in the last). A row done reading joins
    the batch: the shorter of its cache and the batch's is padded on the left, and the (B, L) mask
    hides the padding. A row that stops leaves the batch, and columns only padding holds are cut off;
    its columns go to the prefix cache first (when it has a budget), and a later row starts from the
    longest prefix there instead of an empty cache.
    """

    max_rows = 256
    kv_tokens = None

    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.model = pipeline, pipeline.model
        self.lm = self.model.language_model
        self.cache_argument = cache_keyword(self.lm)
        self.context = pipeline.context_length
        self.reading: dict[int, Reading] = {}
        self.handles: list[int] = []  # the batch's rows, in cache order
        self.leaving: set[int] = set()  # rows stopped since the last pass: cut out together before the next
        self.cache: Cache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, L)
        self.positions = torch.zeros(0, dtype=torch.long)  # (B,) each row's next position
        self.issued = 0
        self.prefix_cache = PrefixCache()

    @property
    def rows_held(self) -> int:
        return len(self.reading) + len(self.handles) - len(self.leaving)

    def start(self, prompt: Prompt) -> tuple[int, int]:
        self.issued += 1
        kept, length = self.prefix_cache.begin(self.issued, prompt, self.model.config.image_token_id)
        past = (
            ([k[None, :, :length] for k in kept[0]], [v[None, :, :length] for v in kept[1]]) if kept else None
        )
        self.reading[self.issued] = Reading(prompt, length, past)
        return self.issued, length

    @torch.inference_mode()
    def read(self, chunks: list[tuple[int, int]]) -> list[np.ndarray | Exception | None]:
        """Each (handle, end): that row reads its prompt up to `end`. Together where they can; when
        the shared pass fails, every row reads alone, so a row's failure stays its own."""
        try:
            new = [handle for handle, _ in chunks if self.reading[handle].embeds is None]
            embeds = self.pipeline.embed_prompts([self.reading[handle].prompt for handle in new])
            for handle, prompt_embeds in zip(new, embeds, strict=True):
                self.reading[handle].embeds = prompt_embeds
            return self._read_together(chunks)
        except Exception as err:
            if len(chunks) == 1:
                return [err]
            return [self.read([chunk])[0] for chunk in chunks]

    def _read_together(self, chunks: list[tuple[int, int]]) -> list[np.ndarray | None]:
        device = self.model.device
        rows = [self.reading[handle] for handle, _ in chunks]
        past = [row.length for row in rows]
        new = [end - row.length for (_, end), row in zip(chunks, rows, strict=True)]
        width, chunk = max(past), max(new)
        mask = torch.zeros(len(rows), width + chunk, dtype=torch.long, device=device)  # (R, C + N)
        positions = torch.zeros(len(rows), chunk, dtype=torch.long, device=device)  # (R, N)
        embeds = rows[0].embeds.new_zeros(len(rows), chunk, rows[0].embeds.shape[-1])  # (R, N, D)
        for i, (row, start, count) in enumerate(zip(rows, past, new, strict=True)):
            mask[i, width - start : width] = 1
            mask[i, width + chunk - count :] = 1
            positions[i, chunk - count :] = torch.arange(start, start + count, device=device)
            embeds[i, chunk - count :] = row.embeds[0, start : start + count]
        layers = None
        if width:  # (R, H, C, d) a layer: each row's past right-aligned, zeros before it
            keys, values = next(row.past for row in rows if row.length)
            shape = (len(rows), keys[0].shape[1], width, keys[0].shape[3])
            layers = [(k.new_zeros(shape), v.new_zeros(shape)) for k, v in zip(keys, values, strict=True)]
            for i, row in enumerate(rows):
                if not row.length:
                    continue
                for (k, v), row_k, row_v in zip(layers, *row.past, strict=True):
                    k[i, :, width - row.length :], v[i, :, width - row.length :] = row_k[0], row_v[0]
        cache = slack_cache(layers)
        logits = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            **{self.cache_argument: cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # (R, V)
        keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
        for i, (start, count) in enumerate(zip(past, new, strict=True)):
            if start and count < chunk:  # a gap between its past and its chunk: move the past up to it
                chunk_start = width + chunk - count
                for part in keys + values:
                    part[i, :, chunk_start - start : chunk_start] = part[i, :, width - start : width].clone()
        done = []
        for i, ((handle, end), row) in enumerate(zip(chunks, rows, strict=True)):
            if end == row.embeds.shape[1]:
                done.append(i)
                del self.reading[handle]
            else:
                row.length, row.past = (
                    end,
                    ([k[i : i + 1, :, -end:] for k in keys], [v[i : i + 1, :, -end:] for v in values]),
                )
        if done:
            lengths = [past[i] + new[i] for i in done]
            self._join(
                [chunks[i][0] for i in done], [k[done] for k in keys], [v[done] for v in values], lengths
            )
        out = logits.float().cpu().numpy()
        return [out[i] if i in done else None for i in range(len(chunks))]

    def _join(
        self, handles: list[int], keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int]
    ) -> None:
        """Rows done reading join the batch: (R, H, L, d) keys and values a layer, each row's `length`
        columns right-aligned."""
        self._cut_leaving()
        device = self.model.device
        length = keys[0].shape[2]
        columns = torch.arange(length, device=device)
        rows_mask = (columns >= length - torch.tensor(lengths, device=device)[:, None]).long()  # (R, L)
        if self.cache is None:
            self.cache = slack_cache(list(zip(keys, values, strict=True)))
            self.mask = rows_mask
            self.positions = torch.tensor(lengths, device=device)
        else:
            width = self.mask.shape[1]
            grow, short = max(0, length - width), max(0, width - length)
            for layer, k, v in zip(self.cache.layers, keys, values, strict=True):
                layer.keys = torch.cat([pad_left(layer.keys, grow, 2), pad_left(k, short, 2)])
                layer.values = torch.cat([pad_left(layer.values, grow, 2), pad_left(v, short, 2)])
            self.mask = torch.cat([pad_left(self.mask, grow, 1), pad_left(rows_mask, short, 1)])
            self.positions = torch.cat([self.positions, torch.tensor(lengths, device=device)])
        self.handles.extend(handles)

    @torch.inference_mode()
    def step(self, handles: list[int], tokens: list[int]) -> np.ndarray:
        self._cut_leaving()
        order = {handle: index for index, handle in enumerate(self.handles)}
        if sorted(order[h] for h in handles) != list(range(len(self.handles))):
            raise ValueError("a step appends a token to every row of the batch")
        device = self.model.device
        batch_tokens = torch.zeros(len(self.handles), dtype=torch.long, device=device)
        batch_tokens[[order[h] for h in handles]] = torch.tensor(tokens, device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.handles), 1)], 1)
        logits = self.lm(
            inputs_embeds=self.model.get_input_embeddings()(batch_tokens[:, None]),  # (B, 1, D)
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            **{self.cache_argument: self.cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # (B, V)
        self.positions += 1
        self.prefix_cache.append(handles, tokens)
        return logits[[order[h] for h in handles]].float().cpu().numpy()

    def stop(self, handle: int) -> None:
        if self.reading.pop(handle, None) is not None:
            self.prefix_cache.forget(handle)
            return
        row = self.handles.index(handle)
        keys, values = [t.keys for t in self.cache.layers], [t.values for t in self.cache.layers]
        length = int(self.positions[row])  # its last columns: padding is on the left
        kept = functools.partial(row_columns, keys, values, row, slice(-length, None))
        self.prefix_cache.end(handle, length, kv_bytes(keys), kept)
        self.leaving.add(handle)
        if len(self.leaving) == len(self.handles):  # the batch is empty: free its cache now, no copy
            self._cut_leaving()

    def _cut_leaving(self) -> None:
        """Cut the rows that stopped out of the batch, all in one copy (answers of the same length end
        together), and the columns only padding holds then."""
        if not self.leaving:
            return
        keep = [index for index, handle in enumerate(self.handles) if handle not in self.leaving]
        self.handles = [self.handles[index] for index in keep]
        self.leaving.clear()
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.positions = self.positions[:0]
            return
        first = int(self.mask[keep].any(0).nonzero()[0])  # columns before it hold padding only
        self.mask, self.positions = self.mask[keep, first:], self.positions[keep]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep, :, first:], layer.values[keep, :, first:]


class Pipeline(Backend):
    """`compiler`: decode over a static KV cache, each pass compiled by this `torch.compile` backend
    ("inductor"; `StaticSession`); None: over a KV cache that grows into spare columns, eagerly
    (`TorchSession`)."""

    name = "torch"

    def __init__(
        self,
        model: MultimodalLM,
        processor: MultimodalProcessor,
        feature_cache_size: int = 64,
        compiler: str | None = None,
    ):
        super().__init__(processor, feature_cache_size)
        self.model = model.eval()
        self.compiler = compiler

    @classmethod
    def load(
        cls,
        name_or_path: str,
        device: str | None = None,
        dtype: str = "auto",
        compile: str = "auto",
        cpu_kernels: bool = True,
    ) -> Pipeline:
        """`dtype`: auto (bf16 on CUDA, else fp32), fp32, bf16, fp16, or int8 (torchao, for CPUs).
        `compile`: on (static KV cache + torch.compile, CUDA graphs on a GPU), off (eager), or auto (on
        for CUDA: on a CPU, compiling takes minutes and buys little). `cpu_kernels`: decoding eagerly on
        a CPU, `prepare_for_cpu_decoding` (False keeps the model as loaded: for baselines)."""
        if compile not in COMPILE_CHOICES:
            raise MmllmError(f"unknown compile setting {compile!r}; choose {', '.join(COMPILE_CHOICES)}")
        device = torch.device(device) if device else default_device()
        if dtype not in (*DTYPES, "auto", "int8"):
            raise MmllmError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)} or int8")
        torch_dtype = DTYPES.get(
            dtype, torch.bfloat16 if device.type == "cuda" and dtype == "auto" else torch.float32
        )
        model, processor = load_model(name_or_path, dtype=torch_dtype)
        if missing := untrained_parts(model):
            log.warning(
                "%s: %s untrained (random weights): answers do not reflect the image",
                name_or_path,
                " and ".join(missing),
            )
        # Unmerged adapters add two small matmuls per adapted layer to every decode step (H100, 32-token
        # answer: Qwen 0.5B with unmerged attention LoRA 1.43 s, the same LM without adapters 0.79 s).
        model.merge_lora()
        if dtype == "int8":
            from mmllm.models.int8 import quantize_int8

            quantize_int8(model)
        compiled = compile == "on" or (compile == "auto" and device.type == "cuda")
        if cpu_kernels and device.type == "cpu" and not compiled:  # (compiled, inductor packs its own)
            prepare_for_cpu_decoding(model)
        return cls(model.to(device), processor, compiler="inductor" if compiled else None)

    @property
    def context_length(self) -> int:
        if self.compiler:  # the static cache holds fewer tokens than the model may read
            return self.session.context
        return self.model.config.text_config.max_position_embeddings

    @functools.cached_property
    def session(self) -> TorchSession | StaticSession:
        """The running batch a scheduler grows and shrinks a step at a time; `decode` runs on it too."""
        if self.compiler:
            return StaticSession(self.model, self.embed_prompt, compiler=self.compiler)
        return TorchSession(self)

    @property
    def trained_parts(self) -> list[str]:
        return list(self.model.config.trained_parts or ())

    @property
    def reads_images_as_words(self) -> bool:
        return self.model.config.reads_images_as_words

    def image_words(self, pixels: np.ndarray) -> list[str]:
        return self.model.image_words(self.image_features(torch.from_numpy(pixels)))

    @torch.inference_mode()
    def image_features(self, images: list[ImageInput] | torch.Tensor) -> torch.Tensor:
        """(I, N, D_v) features of images or (I, 3, S, S) pixels, from the LRU cache when seen before."""
        pixels = images if isinstance(images, torch.Tensor) else self.processor.image_processor(images)

        def compute(rows: list[int]) -> torch.Tensor:
            return self.model.get_image_features(pixels[rows].to(self.model.device))

        return torch.stack(self.features.through(pixels.numpy(), compute))  # keyed by what the tower sees

    def embed_prompts(self, prompts: list[Prompt]) -> list[torch.Tensor]:
        """Each prompt's (1, P, D) LM input embeddings, its images' projected rows at their
        placeholders; the images of all of them through the vision tower in one pass."""
        pixels = [prompt.pixel_values for prompt in prompts if prompt.pixel_values is not None]
        features = self.image_features(torch.from_numpy(np.concatenate(pixels))) if pixels else None
        embeds, taken = [], 0
        for prompt in prompts:
            images = 0 if prompt.pixel_values is None else len(prompt.pixel_values)
            ids = torch.tensor([prompt.input_ids], device=self.model.device)
            own = features[taken : taken + images] if images else None
            embeds.append(self.model.embed_inputs(ids, image_features=own))
            taken += images
        return embeds

    def embed_prompt(self, prompt: Prompt) -> torch.Tensor:
        """A prompt's (1, P, D) LM input embeddings (`embed_prompts`)."""
        return self.embed_prompts([prompt])[0]

    def _inputs(self, prompts: list[Prompt]) -> dict:
        padded = self.processor.pad([{"input_ids": prompt.input_ids} for prompt in prompts])
        batch = {k: v.to(self.model.device) for k, v in padded.items()}
        pixels = [prompt.pixel_values for prompt in prompts if prompt.pixel_values is not None]
        if pixels:
            batch["image_features"] = self.image_features(torch.from_numpy(np.concatenate(pixels)))
        return batch

    @property
    def logits_width(self) -> int:
        return self.model.config.text_config.vocab_size

    def decode(self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker) -> list[int]:
        if settings.num_beams == 1:
            return decode_all(self.session, prompts, settings, rows, self.shaper)
        return self.decode_with_generate(prompts, settings, rows)  # beams cannot share steps

    @torch.inference_mode()
    def decode_with_generate(
        self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker
    ) -> list[int]:
        """The batch through transformers' own `generate` (up to `settings.max_new_tokens`, the longest
        row's limit), its tokens handed to `rows` afterwards: beam search, and the reference the
        sessions' answers are tested against."""
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        inputs = self._inputs(prompts)
        output = self.model.generate(**inputs, generation_config=settings.generation_config(self.processor))
        for column in output[:, inputs["input_ids"].shape[1] :].T:
            rows.step(column.tolist())
        return inputs["attention_mask"].sum(1).tolist()
