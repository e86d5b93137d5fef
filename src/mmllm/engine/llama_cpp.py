"""The llama.cpp backend: a `mmllm export gguf` folder, its language model run by llama.cpp (through
llama-cpp-python's C API) and its image rows computed by mmllm's exported vision graph (`vision.onnx`,
the one projection path), so every design runs here, whether or not llama.cpp has an mmproj graph for it.

The prompt reaches llama.cpp as it is: text runs as token batches, each image's rows as an embedding
batch (`llama_batch.embd`) at the positions of its placeholder tokens. Each row of a batch is one
sequence in a unified KV cache (`LlamaCppSession`): rows join as room frees up and leave when done,
in batch decoding and under the server's scheduler alike. Greedy or sampled decoding; no beams. A row
that ends may leave its sequence behind for the prefix cache, in the same KV cache: running rows win
it back whenever they need the room.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mmllm.engine.backend import Prompt
from mmllm.engine.exported import ExportedBackend, onnx_session, read_export_settings
from mmllm.engine.prefix_cache import PrefixCache
from mmllm.engine.rows import RowTracker
from mmllm.engine.running import decode_all, read_each
from mmllm.engine.settings import GenerationSettings
from mmllm.errors import MmllmError
from mmllm.processor import MultimodalProcessor

LLAMA_CPP_CONFIG = "mmllm_llamacpp.json"
LLAMA_CPP_FORMAT = 1
PREFERRED = ("q4_k_m", "q8_0", "f16", "f32")  # what `--dtype auto` picks: the smallest file first
CONTEXT_TOKENS = 4096  # the KV cache all rows of a batch share (Qwen2.5-0.5B: 12 KB a token in f16)
MAX_ROWS = 16
KEPT = 16  # sequences the prefix cache may keep beside the running rows
F16_BYTES = 2  # llama.cpp's KV cache holds f16 keys and values
CHUNK = 512  # tokens or image rows per llama_decode call while reading a prompt
GGML_LOG_ERROR = 4  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT
_LOG_CALLBACK: list = []


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MmllmError(
            "this needs llama-cpp-python, built from source: `make install-llamacpp` in mmllm's checkout "
            "(builds the wheel once for this CPU and caches it), or pip install -e '.[llamacpp]'"
        ) from None
    return llama_cpp


def quiet_llama_cpp(verbose: bool = False) -> None:
    """llama.cpp logs every tensor it loads or quantises to stderr (llama-cpp-python's own filter reads
    ggml's levels off by one, so its warnings pass as errors); keep its errors only, unless `verbose`."""
    import sys

    llama_cpp = import_llama_cpp()

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data) -> None:
        if verbose or level == GGML_LOG_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _LOG_CALLBACK[:] = [log]  # ctypes calls it later: it must outlive this function
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))


def segments(input_ids: list[int], image_token_id: int) -> list[tuple[bool, int, int]]:
    """The prompt's runs as (is_image, start, end): text tokens, or one image's placeholder rows."""
    runs: list[tuple[bool, int, int]] = []
    for index, token in enumerate(input_ids):
        image = token == image_token_id
        if runs and runs[-1][0] == image:
            runs[-1] = (image, runs[-1][1], index + 1)
        else:
            runs.append((image, index, index + 1))
    return runs


class LlamaCppBackend(ExportedBackend):
    name = "llama.cpp"

    def __init__(self, path: Path, kind: str, processor: MultimodalProcessor, settings: dict, threads: int):
        super().__init__(processor, onnx_session(path / "vision.onnx", threads), settings)
        llama_cpp = self.llama_cpp = import_llama_cpp()
        quiet_llama_cpp()
        self.kind = kind
        llama_cpp.llama_backend_init()
        weights = path / settings["gguf"][kind]
        self.model = llama_cpp.llama_model_load_from_file(
            str(weights).encode(), llama_cpp.llama_model_default_params()
        )
        if not self.model:
            raise MmllmError(f"llama.cpp could not load {weights}")
        self.n_ctx = min(settings["context_length"], CONTEXT_TOKENS)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = self.n_ctx, CHUNK, CHUNK
        params.n_seq_max, params.kv_unified, params.no_perf = MAX_ROWS + KEPT, True, True
        # Logits of at most one position a sequence (llama.cpp asks for that many): by default it sizes
        # its output buffers for a whole batch of them (Qwen2.5: 512 x 151,936 floats, 311 MB, twice).
        params.n_outputs_max = params.n_seq_max
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise MmllmError("llama.cpp could not make a context for the model")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.width = llama_cpp.llama_model_n_embd(self.model)
        self.tokens = llama_cpp.llama_batch_init(CHUNK, 0, 1)
        self.rows = llama_cpp.llama_batch_init(CHUNK, self.width, 1)
        # One context: one decode at a time. Re-entrant: a decode short of room evicts kept prefixes.
        self.lock = threading.RLock()

    @classmethod
    def load(cls, path: str | Path, dtype: str = "auto", threads: int | None = None) -> LlamaCppBackend:
        """`dtype`: which of the export's GGUF files runs (auto: the fastest there)."""
        path = Path(path)
        settings = read_export_settings(path, LLAMA_CPP_CONFIG, LLAMA_CPP_FORMAT, "export gguf")
        written = settings["gguf"]
        kind = next((k for k in PREFERRED if k in written), None) if dtype == "auto" else dtype
        if kind not in written:
            raise MmllmError(
                f"{path} holds {', '.join(written)} GGUF files, not {dtype}; export it with "
                f"`mmllm export gguf --outtype {dtype}`"
            )
        processor = MultimodalProcessor.from_pretrained(path, without_torch=True)
        return cls(path, kind, processor, settings, threads or os.cpu_count() or 1)

    def __del__(self):
        llama_cpp = getattr(self, "llama_cpp", None)
        if llama_cpp and getattr(self, "ctx", None):
            llama_cpp.llama_batch_free(self.tokens)
            llama_cpp.llama_batch_free(self.rows)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def _run(self, batch, count: int, make_room: Callable[[], bool] = lambda: False) -> None:
        """Decode `count` entries of `batch`; while the KV cache has no room for them (llama_decode
        returns 1 and changes nothing), `make_room()` frees some, until it cannot."""
        batch.n_tokens = count
        while (status := self.llama_cpp.llama_decode(self.ctx, batch)) == 1 and make_room():
            pass
        if status != 0:
            raise RuntimeError(f"llama.cpp could not decode the batch (llama_decode returned {status})")

    def _fill(self, batch, index: int, position: int, sequence: int, logits: bool) -> None:
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence
        batch.logits[index] = logits

    def _logits(self, index: int) -> np.ndarray:
        """(V,) logits of the batch's `index`-th token: a view of llama.cpp's buffer, valid until the
        next decode (callers copy it into their own array)."""
        pointer = self.llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    @functools.cached_property
    def session(self) -> LlamaCppSession:
        """The context's sequences as a running batch: what the scheduler and `decode` both run on."""
        return LlamaCppSession(self)

    @property
    def logits_width(self) -> int:
        return self.n_vocab

    def decode(self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker) -> list[int]:
        return decode_all(self.session, prompts, settings, rows, self.shaper)


class LlamaCppSession:
    """The rows of a running batch as llama.cpp sequences in the one unified KV cache: a row reads its
    prompt (text runs as token batches, image runs as row batches) into its own sequence, steps add one
    token to each row in one batch, and a row that stops has its sequence removed from the cache.

    With a prefix cache, a row that stops hands its cells to a kept sequence (one of `KEPT` more ids)
    first, and a row that starts alike shares the kept cells it matches (`llama_memory_seq_cp` adds a
    sequence id to cells, it copies nothing). Kept sequences use the cells running rows are promised
    (`kv_tokens`): a decode that finds no room evicts them, least recently used first."""

    max_rows = MAX_ROWS

    def __init__(self, backend: LlamaCppBackend):
        self.backend, self.llama_cpp = backend, backend.llama_cpp
        self.kv_tokens = self.context = backend.n_ctx
        self.free = list(range(MAX_ROWS))
        self.kept_free = list(range(MAX_ROWS, MAX_ROWS + KEPT))
        self.prefix_cache = PrefixCache(max_entries=KEPT, release=self._release)
        model, api = backend.model, self.llama_cpp
        head_dim = backend.width // api.llama_model_n_head(model)
        kv_width = api.llama_model_n_head_kv(model) * head_dim
        self.token_bytes = 2 * api.llama_model_n_layer(model) * kv_width * F16_BYTES  # keys and values
        self.prompts: dict[int, tuple[list[int], np.ndarray | None]] = {}  # ids, (P, D) image rows
        self.positions: dict[int, int] = {}
        self.memory = self.llama_cpp.llama_get_memory(backend.ctx)
        self.llama_cpp.llama_memory_clear(self.memory, True)

    @property
    def rows_held(self) -> int:
        return MAX_ROWS - len(self.free)

    def start(self, prompt: Prompt) -> tuple[int, int]:
        if not self.free:
            raise RuntimeError(f"all {MAX_ROWS} llama.cpp sequences are in use")
        rows = None
        if prompt.pixel_values is not None:
            rows = self.backend.image_rows(prompt.pixel_values)  # (I, N, D)
            rows = rows.reshape(-1, rows.shape[-1])  # one per placeholder, in order
        sequence = self.free.pop(0)
        kept, length = self.prefix_cache.begin(sequence, prompt, self.backend.settings["image_token_id"])
        if kept is not None:
            with self.backend.lock:
                self.llama_cpp.llama_memory_seq_cp(self.memory, kept, sequence, 0, length)
        self.prompts[sequence], self.positions[sequence] = (prompt.input_ids, rows), length
        return sequence, length

    def read(self, chunks: list[tuple[int, int]]) -> list[np.ndarray | Exception | None]:
        return read_each(self._read, chunks)

    def _read(self, handle: int, end: int) -> np.ndarray | None:
        ids, rows = self.prompts[handle]
        image_token = self.backend.settings["image_token_id"]
        start = self.positions[handle]
        placeholders_before = sum(token == image_token for token in ids[:start])
        logits = None
        with self.backend.lock:
            for image, low, high in segments(ids[start:end], image_token):
                values = rows[placeholders_before : placeholders_before + high - low] if image else None
                placeholders_before += (high - low) if image else 0
                for chunk in range(low, high, CHUNK):
                    top = min(high, chunk + CHUNK)
                    batch = self.backend.rows if image else self.backend.tokens
                    for index, position in enumerate(range(start + chunk, start + top)):
                        if not image:
                            batch.token[index] = ids[position]
                        self.backend._fill(batch, index, position, handle, position == len(ids) - 1)
                    if image:
                        part = np.ascontiguousarray(values[chunk - low : top - low], np.float32)
                        ctypes.memmove(batch.embd, part.ctypes.data, part.nbytes)
                    self.backend._run(batch, top - chunk, self.prefix_cache.evict_oldest)
                    if start + top == len(ids):
                        logits = self.backend._logits(top - chunk - 1).copy()
        self.positions[handle] = end
        return logits

    def step(self, handles: list[int], tokens: list[int]) -> np.ndarray:
        batch = self.backend.tokens
        with self.backend.lock:
            for index, (handle, token) in enumerate(zip(handles, tokens, strict=True)):
                batch.token[index] = token
                self.backend._fill(batch, index, self.positions[handle], handle, True)
                self.positions[handle] += 1
            self.backend._run(batch, len(handles), self.prefix_cache.evict_oldest)
            self.prefix_cache.append(handles, tokens)
            return np.stack([self.backend._logits(index) for index in range(len(handles))])

    def stop(self, handle: int) -> None:
        ids, position = self.prompts.pop(handle)[0], self.positions.pop(handle)
        with self.backend.lock:
            if position < len(ids):
                self.prefix_cache.forget(handle)
            else:
                keep = functools.partial(self._keep, handle, position)
                self.prefix_cache.end(handle, position, self.token_bytes, keep)
            self.llama_cpp.llama_memory_seq_rm(self.memory, handle, -1, -1)
        self.free.append(handle)

    def _keep(self, handle: int, length: int) -> int:
        """A kept sequence sharing the row's first `length` cells."""
        kept = self.kept_free.pop()
        self.llama_cpp.llama_memory_seq_cp(self.memory, handle, kept, 0, length)
        return kept

    def _release(self, kept: int) -> None:
        with self.backend.lock:
            self.llama_cpp.llama_memory_seq_rm(self.memory, kept, -1, -1)
        self.kept_free.append(kept)
