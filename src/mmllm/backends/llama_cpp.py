"""The llama.cpp backend: a `mmllm export gguf` folder, its language model run by llama.cpp (through
llama-cpp-python's C API) and its image rows computed by mmllm's exported vision graph (`vision.onnx`,
the one projection path), so every design runs here, whether or not llama.cpp has an mmproj graph for it.

The prompt reaches llama.cpp as it is: text runs as token batches, each image's rows as an embedding
batch (`llama_batch.embd`) at the positions of its placeholder tokens. A batch of prompts decodes as one
llama.cpp batch, one sequence per row in a unified KV cache; rows that do not fit the cache together
decode in turns. Greedy or sampled decoding; no beams.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np

from mmllm.backends.exported import ExportedBackend, onnx_session, read_export_settings
from mmllm.errors import MmllmError
from mmllm.generation import GenerationSettings, Prompt, RowTracker, choose_tokens
from mmllm.processor import MultimodalProcessor

LLAMA_CPP_CONFIG = "mmllm_llamacpp.json"
LLAMA_CPP_FORMAT = 1
PREFERRED = ("q4_k_m", "q8_0", "f16", "f32")  # what `--dtype auto` picks, fastest first
CONTEXT_TOKENS = 4096  # the KV cache all rows of a batch share (Qwen2.5-0.5B: 12 KB a token in f16)
MAX_ROWS = 16
CHUNK = 512  # tokens or image rows per llama_decode call while reading a prompt
GGML_LOG_ERROR = 4  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT
_LOG_CALLBACK: list = []


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MmllmError(
            "this needs llama-cpp-python, built from source: pip install 'mmllm[llamacpp]' "
            "(or `make install-llamacpp`, which builds the wheel once and caches it)"
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
        params.n_seq_max, params.kv_unified, params.no_perf = MAX_ROWS, True, True
        # Logits of at most one position a row: by default llama.cpp sizes its output buffers for a
        # whole batch of them (Qwen2.5: 512 x 151,936 floats, 311 MB, twice).
        params.n_outputs_max = MAX_ROWS
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise MmllmError("llama.cpp could not make a context for the model")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.width = llama_cpp.llama_model_n_embd(self.model)
        self.tokens = llama_cpp.llama_batch_init(CHUNK, 0, 1)
        self.rows = llama_cpp.llama_batch_init(CHUNK, self.width, 1)
        self.lock = threading.Lock()  # one context: one decode at a time

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

    def _run(self, batch, count: int) -> None:
        batch.n_tokens = count
        status = self.llama_cpp.llama_decode(self.ctx, batch)
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

    def _read_prompts(self, prompts: list[list[int]], image_rows: list[np.ndarray | None]) -> np.ndarray:
        """Feed prompts into the KV cache, prompt i as sequence i; the k-th run of every prompt goes in
        the same llama.cpp batches (text runs as tokens, image runs as rows: a batch holds one kind).
        Returns the (R, V) logits after each prompt's last token."""
        runs = [segments(ids, self.settings["image_token_id"]) for ids in prompts]
        images = [iter(rows if rows is not None else ()) for rows in image_rows]  # (N, D) per image
        logits = np.zeros((len(prompts), self.n_vocab), np.float32)
        for phase in range(max(len(r) for r in runs)):
            entries: dict[bool, list] = {False: [], True: []}  # (sequence, position, token or row, last)
            for seq, its_runs in enumerate(runs):
                if phase < len(its_runs):
                    image, start, end = its_runs[phase]
                    values = next(images[seq]) if image else prompts[seq][start:end]
                    final = end - 1 if phase == len(its_runs) - 1 else -1
                    entries[image] += [(seq, p, values[p - start], p == final) for p in range(start, end)]
            for image, items in entries.items():
                batch = self.rows if image else self.tokens
                for low in range(0, len(items), CHUNK):
                    chunk = items[low : low + CHUNK]
                    for index, (seq, position, value, last) in enumerate(chunk):
                        if not image:
                            batch.token[index] = value
                        self._fill(batch, index, position, seq, last)
                    if image:
                        rows = np.ascontiguousarray([value for _, _, value, _ in chunk], np.float32)
                        ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
                    self._run(batch, len(chunk))
                    for index, (seq, _, _, last) in enumerate(chunk):
                        if last:
                            logits[seq] = self._logits(index)
        return logits

    def _groups(self, prompts: list[Prompt], limits: list[int]) -> list[list[int]]:
        """Rows in turns whose prompts and answers fit the shared KV cache together."""
        groups: list[list[int]] = [[]]
        used = 0
        for row, prompt in enumerate(prompts):
            need = len(prompt.input_ids) + limits[row]
            if groups[-1] and (used + need > self.n_ctx or len(groups[-1]) == MAX_ROWS):
                groups.append([])
                used = 0
            groups[-1].append(row)
            used += need
        return groups

    def decode(self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker) -> list[int]:
        rng = np.random.default_rng(settings.seed)
        for row, prompt in enumerate(prompts):  # an answer ends where the context does
            rows.limits[row] = min(rows.limits[row], self.n_ctx - len(prompt.input_ids))
        with_images = [p for p in prompts if p.pixel_values is not None]
        per_prompt: list[np.ndarray | None] = [None] * len(prompts)
        if with_images:
            rows_of_all = self.image_rows(np.concatenate([p.pixel_values for p in with_images]))
            counts = np.cumsum([len(p.pixel_values) for p in with_images])[:-1]
            images = iter(np.split(rows_of_all, counts))  # (I_p, N, D) per prompt with images
            per_prompt = [next(images) if p.pixel_values is not None else None for p in prompts]
        with self.lock:
            for group in self._groups(prompts, rows.limits):
                self._decode_group(group, prompts, per_prompt, settings, rows, rng)
        return [len(prompt.input_ids) for prompt in prompts]

    def _decode_group(self, group, prompts, per_prompt, settings, rows: RowTracker, rng) -> None:
        llama_cpp = self.llama_cpp
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        logits = self._read_prompts([prompts[r].input_ids for r in group], [per_prompt[r] for r in group])
        positions = [len(prompts[row].input_ids) for row in group]
        while True:
            chosen = choose_tokens(logits, settings, rng, self.processor.stop_token_ids).tolist()
            rows.step(chosen, group)
            active = [(seq, row) for seq, row in enumerate(group) if not rows.finish[row]]
            if not active:
                return
            for index, (seq, _) in enumerate(active):
                self.tokens.token[index] = chosen[seq]
                self._fill(self.tokens, index, positions[seq], seq, True)
                positions[seq] += 1
            self._run(self.tokens, len(active))
            for index, (seq, _) in enumerate(active):  # finished rows keep stale logits: ignored
                logits[seq] = self._logits(index)
