"""The PyTorch backend (`Pipeline`, what `--backend torch` runs): a `MultimodalLM` answering through
its running batch, eager over a dynamic cache (`TorchSession`) or compiled over a static one
(`static_session.StaticSession`); beam search through transformers' `generate`."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from transformers import DynamicCache

from mmllm.engine.backend import Backend, Prompt
from mmllm.engine.prefix_cache import PrefixCache
from mmllm.engine.rows import RowTracker
from mmllm.engine.running import decode_all
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.static_session import StaticSession, kv_bytes, row_columns
from mmllm.errors import MmllmError
from mmllm.images import ImageInput
from mmllm.models.build import load_model, untrained_parts
from mmllm.models.language import cache_keyword
from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import MultimodalProcessor

log = logging.getLogger("mmllm")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_CHOICES = ("auto", "on", "off")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """`tensor` with `columns` zero columns put before dimension `dim`'s first."""
    if not columns:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


class TorchSession:
    """Rows decoding together over one left-padded KV cache (a `DynamicCache` of (B, H, L, d) layers).

    A row reads its prompt alone, in chunks, into a cache of its own, then joins the batch: the shorter
    of its cache and the batch's is padded on the left, and the (B, L) mask hides the padding. Each row
    keeps its own positions, so it computes what it would alone. A row that stops leaves the batch, and
    columns only padding holds are cut off; its columns go to the prefix cache first (when it has a
    budget), and a later row starts from the longest prefix there instead of an empty cache.
    """

    max_rows = 256
    kv_tokens = None

    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.model = pipeline, pipeline.model
        self.lm = self.model.language_model
        self.cache_argument = cache_keyword(self.lm)
        self.context = pipeline.context_length
        self.reading: dict[int, tuple[torch.Tensor, DynamicCache]] = {}  # (1, P, D) prompt, its cache
        self.handles: list[int] = []  # the batch's rows, in cache order
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, L)
        self.positions = torch.zeros(0, dtype=torch.long)  # (B,) each row's next position
        self.issued = 0
        self.prefix_cache = PrefixCache()

    @property
    def rows_held(self) -> int:
        return len(self.reading) + len(self.handles)

    @torch.inference_mode()
    def start(self, prompt: Prompt) -> tuple[int, int]:
        self.issued += 1
        embeds = self.pipeline.embed_prompt(prompt)
        kept, length = self.prefix_cache.begin(self.issued, prompt, self.model.config.image_token_id)
        layers = (
            [(k[None, :, :length], v[None, :, :length]) for k, v in zip(*kept, strict=True)] if kept else None
        )
        self.reading[self.issued] = (embeds, DynamicCache(layers))  # its update copies what it is given
        return self.issued, length

    @torch.inference_mode()
    def read(self, handle: int, end: int) -> np.ndarray | None:
        embeds, cache = self.reading[handle]
        start = cache.get_seq_length()
        positions = torch.arange(start, end, device=embeds.device)[None]  # (1, C)
        logits = self.lm(
            inputs_embeds=embeds[:, start:end],
            position_ids=positions,
            **{self.cache_argument: cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits
        if end < embeds.shape[1]:
            return None
        del self.reading[handle]
        self._join(handle, cache, end)
        return logits[0, -1].float().cpu().numpy()

    def _join(self, handle: int, cache: DynamicCache, length: int) -> None:
        device = self.model.device
        width = self.mask.shape[1]
        if self.cache is None:
            self.cache, width = cache, length
            self.mask = torch.ones(0, length, dtype=torch.long, device=device)
            self.positions = self.positions.to(device)
        else:
            grow, short = max(0, length - width), max(0, width - length)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([pad_left(mine.keys, grow, 2), pad_left(theirs.keys, short, 2)])
                mine.values = torch.cat([pad_left(mine.values, grow, 2), pad_left(theirs.values, short, 2)])
            self.mask = pad_left(self.mask, grow, 1)
            width += grow
        row_mask = pad_left(torch.ones(1, length, dtype=torch.long, device=device), width - length, 1)
        self.mask = torch.cat([self.mask, row_mask])
        self.positions = torch.cat([self.positions, torch.tensor([length], device=device)])
        self.handles.append(handle)

    @torch.inference_mode()
    def step(self, handles: list[int], tokens: list[int]) -> np.ndarray:
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
        keep = [index for index, h in enumerate(self.handles) if h != handle]
        self.handles.remove(handle)
        if not self.handles:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.positions = self.positions[:0]
            return
        first = int(self.mask[keep].any(0).nonzero()[0])  # columns before it hold padding only
        self.mask, self.positions = self.mask[keep, first:], self.positions[keep]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep, :, first:], layer.values[keep, :, first:]


class Pipeline(Backend):
    """`compiler`: decode over a static KV cache, each pass compiled by this `torch.compile` backend
    ("inductor"; `StaticSession`); None: over a growing `DynamicCache`, eagerly (`TorchSession`)."""

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
        cls, name_or_path: str, device: str | None = None, dtype: str = "auto", compile: str = "auto"
    ) -> Pipeline:
        """`dtype`: auto (bf16 on CUDA, else fp32), fp32, bf16, fp16, or int8 (torchao, for CPUs).
        `compile`: on (static KV cache + torch.compile, CUDA graphs on a GPU), off (eager), or auto (on
        for CUDA: on a CPU, compiling takes minutes and buys little)."""
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

    def embed_prompt(self, prompt: Prompt) -> torch.Tensor:
        """A prompt's (1, P, D) LM input embeddings, its images' projected rows at their placeholders."""
        ids = torch.tensor([prompt.input_ids], device=self.model.device)
        features = None
        if prompt.pixel_values is not None:
            features = self.image_features(torch.from_numpy(prompt.pixel_values))
        return self.model.embed_inputs(ids, image_features=features)

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
