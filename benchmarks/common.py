"""Shared benchmark helpers: timing, a markdown table, results as JSON next to the scripts."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, by device-name fragment.
GPU_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device) -> tuple[float, str]:
    """The device's peak FLOP/s and where the figure comes from: a data sheet for known GPUs, else
    measured (the best of a few large matmuls in the dtype the benchmarks run in)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops in GPU_PEAK_FLOPS.items():
            if fragment in name:
                return flops, f"{fragment} data sheet, dense bf16"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best, f"measured: 2048x2048 {str(dtype).removeprefix('torch.')} matmul"


def lm_weights(model) -> tuple[int, int]:
    """(body, head): the LM's matmul weights outside its vocabulary matrices, and its head's. A decoded
    token costs 2 x (body + head) FLOPs; a trained one 4 x body (forward and input gradients: the
    frozen or LoRA weights add next to no weight gradients, and the head runs on answer tokens only).
    The input embedding is a lookup; the vision tower runs per image."""
    lm = model.language_model
    head = lm.get_output_embeddings().weight.numel()
    embedding = model.get_input_embeddings().weight.numel()
    untied_head = 0 if lm.config.tie_word_embeddings else head
    return sum(p.numel() for p in lm.parameters()) - embedding - untied_head, head


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> str:
    """Model FLOPs utilisation: the model's FLOPs per token x tokens/s over the device's peak."""
    return f"{flops_per_token * tokens_per_s / peak:.1%}"


def timed(fn: Callable[[], int], warmup: Callable[[], Any] | None = None) -> tuple[int, float]:
    """Run `fn` (which returns how many items it processed) after an optional warm-up; (items, seconds)."""
    if warmup is not None:
        warmup()
    start = time.perf_counter()
    items = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return items, time.perf_counter() - start


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(
    name: str, rows: list[dict[str, Any]], settings: dict[str, Any], out: Path = RESULTS, notes: str = ""
) -> None:
    """Print the table and write `OUT/NAME.json` (and `.md`, with `notes` under the table; OUT:
    `results/` by default)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    print(text)
    payload = {"benchmark": name, "machine": machine(), "settings": settings, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    tail = f"\n{notes}\n" if notes else ""
    (out / f"{name}.md").write_text(f"# {name}\n\n{json.dumps(payload['machine'])}\n\n{text}\n{tail}")


# Real architectures, for random-weight runs (speed does not depend on weight values, and no
# weights need to travel to a GPU machine): the LMs' own config.json fields.
RANDOM_LMS = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
}
# SmolLM2-135M's layer, 2 deep: `benchmarks/gpu.sh --device cpu` runs every step of the GPU script with
# it, where compiling 30 unrolled layers would take minutes (CI runs it so).
RANDOM_LMS["smollm2-2-layers"] = {**RANDOM_LMS["smollm2-135m"], "num_hidden_layers": 2}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_lm(name: str, folder: Path) -> str:
    """A folder holding `RANDOM_LMS[name]`'s config and a byte-level ChatML tokenizer (the LM's own
    tokenizer need not travel either; prompts come out a few times longer in tokens): what `lm:` takes
    to build that LM with random weights. Ids past the 256 bytes decode to words of their own, so
    whatever a random LM picks streams as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(RANDOM_LMS[name], indent=2))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = [f"w{i}" for i in range(len(alphabet), RANDOM_LMS[name]["vocab_size"] - 8)]  # room for specials
    vocab = {token: i for i, token in enumerate(alphabet + words)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.save_pretrained(folder)
    return str(folder)
