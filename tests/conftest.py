"""Tiny but real fixtures: BPE tokenizers trained here with real chat templates, tiny HF configs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, LlamaConfig, Phi3Config, PreTrainedTokenizerFast, Qwen2Config

from mmllm import MultimodalConfig, MultimodalLM, MultimodalProcessor
from mmllm.images import ImageProcessor
from mmllm.models.build import image_processor_for
from mmllm.serve.launch import free_port, wait_until_up

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Qwen2.5's ChatML structure: a default system prompt when none is given.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Phi-3.5-mini-instruct's template, verbatim.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Llama 3's header structure, as SmolLM-class Llama chat models use.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] }}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEMPLATES = {
    "qwen2": (
        CHATML,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
    "phi3": (
        PHI3,
        ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        {"eos_token": "<|endoftext|>"},
    ),
    "llama": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
}

CORPUS = [
    "What is in this image? A red circle on a white background.",
    "What shape is it? It is a blue square. What colour is the triangle? Green.",
    "Describe the image briefly. A cat sleeps on a sofa next to a cup of coffee.",
    "You are a helpful assistant. The answer is yes. The answer is no. How many? Two.",
] * 20


def start_server(command: list[str], url: str) -> subprocess.Popen:
    """Start a server command and wait until `url` answers 200; fail with its output if it never does."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(process, url, timeout=300)  # importing gradio is slow on a busy 2-core machine
    except RuntimeError as err:
        pytest.fail(f"{' '.join(command[2:5])}: {err}: " + process.stdout.read())
    return process


def engine_python(venv: str, make_target: str) -> str:
    """The python of an engine installed in a virtual environment of its own (lmms-eval, vLLM): a skip
    where it is not installed, a failure where MMLLM_REQUIRE_ENGINES is set (CI installs them all)."""
    python = Path(__file__).resolve().parent.parent / venv / "bin" / "python"
    if not python.exists():
        message = f"{venv} is not installed: run `make {make_target}`"
        if os.environ.get("MMLLM_REQUIRE_ENGINES"):
            pytest.fail(message)
        pytest.skip(message)
    return str(python)


def save_tiny(folder: Path, kind: str = "qwen2", **options) -> Path:
    """A tiny model (`make_tiny(kind, **options)`) saved with its processor, for commands to load."""
    model, processor = make_tiny(kind, **options)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def serving(model: Path | str, *options: str) -> Iterator[str]:
    """`mmllm serve --model MODEL OPTIONS…` on a free port, live for the block; yields its URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mmllm.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        *options,
    ]
    url = f"http://127.0.0.1:{port}"
    process = start_server(command, f"{url}/health")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_jobs(queue, items: list[tuple], stop: list[str] | None = None) -> list:
    """Submit (prompt, settings) jobs to a request queue at once; their answers (or errors), in order."""
    loop = asyncio.new_event_loop()
    jobs = [queue.job(p, s, stop, loop=loop) for p, s in items]
    for job in jobs:
        queue.submit(job)
    results = loop.run_until_complete(asyncio.gather(*(job.future for job in jobs), return_exceptions=True))
    loop.close()
    return results


def easy_vqa_predictions(out: Path, model: Path | str, backend: str, dtype: str = "auto") -> list[str]:
    """`mmllm eval` of 6 easy-VQA test questions (4 tokens each) on `backend`: its predictions."""
    import json

    from mmllm.cli import main

    task = ["eval", "--task", "easy-vqa", "--data", "easy-vqa:test", "datasets.0.limit=6", "--out", str(out)]
    runtime = ["--model", str(model), "--backend", backend, "--dtype", dtype, "--max-new-tokens", "4"]
    assert main([*task, *runtime]) == 0
    assert json.loads((out / "run.json").read_text())["backend"] == backend
    return [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").open()]


def recipe(tiny_dir, out, **overrides) -> dict:
    """A short training run of the tiny model at `tiny_dir` into `out`; dotted keys override."""
    base = {
        "init_from": str(tiny_dir),
        "data": {
            "datasets": [{"format": "easy-vqa", "split": "train", "per_image": True, "limit": 8}],
            "batch_size": 4,
            "num_workers": 0,
            "max_length": 256,
        },
        "parts": {"projector": "full", "language_model": "frozen", "vision_tower": "frozen"},
        "optim": {"lr_projector": 1e-2, "lr_lora": 1e-2, "lr_language": 1e-3, "warmup_ratio": 0.0},
        "max_steps": 12,
        "save_every": 4,
        "keep_last": 2,
        "log_every": 1,
        "output_dir": str(out),
        "tensorboard": False,
    }
    for key, value in overrides.items():
        node = base
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return base


def check_streams_and_cancels(backend, image) -> None:
    """A stream gives the whole answer, and a client that leaves after the first piece stops its row."""
    import threading

    from mmllm.engine.settings import GenerationSettings

    conversation = [{"role": "user", "content": "<image>\nWhat is it?"}]
    settings = GenerationSettings(max_new_tokens=10, ignore_eos=True)
    whole = backend.ask(image, "What is it?", settings)
    assert "".join(backend.stream(conversation, [image], settings)) == whole
    prompt = backend.prepare(conversation, [image])
    cancelled = threading.Event()
    [done] = backend.complete_prompts(
        [prompt], settings, on_delta=lambda *_: cancelled.set(), cancelled=[cancelled]
    )
    assert done.finish_reason == "cancelled" and done.completion_tokens < 10


def stop_lists(answer: str) -> list[list[str]]:
    """Stop strings from inside a greedy answer, so they fire mid-answer: several characters (tokens)
    long, at the very start (the answer is empty), one a prefix of another either way round (the
    earliest match wins), two at once, one whose beginning ends the answer but never the rest (held
    back, then handed on), one at the end."""
    assert len(answer) >= 10, answer
    mid = len(answer) // 2
    return [
        [answer[mid : mid + 3]],
        [answer[:2]],
        [answer[mid : mid + 2], answer[mid : mid + 5]],
        [answer[mid : mid + 5], answer[mid : mid + 2]],
        [answer[3:5], answer[mid + 1 : mid + 4]],
        [answer[-3:] + "\x00never"],
        [answer[-3:]],
    ]


def cut_at_stops(answer: str, stops: list[str]) -> tuple[str, bool]:
    """`answer` cut before its earliest stop string, and whether one was there."""
    found = [answer.find(stop) for stop in stops if stop in answer]
    return (answer[: min(found)], True) if found else (answer, False)


def check_streams_equal_answers(backend, conversations: list, pictures: list) -> None:
    """For each of `stop_lists`, on every row: the pieces `on_delta` receives joined are the answer's
    text, which is the greedy answer cut at its earliest stop string, and its finish reason says so;
    `stream` gives the first row's text too."""
    from mmllm.engine.settings import GenerationSettings

    settings = GenerationSettings(max_new_tokens=16, ignore_eos=True)
    reference = backend.complete(conversations, pictures, settings)
    for stops in stop_lists(reference[0].text):
        per_row = [stops] * len(conversations)
        answers = backend.complete(conversations, pictures, settings, per_row)
        deltas = [""] * len(conversations)

        def collect(row: int, text: str, deltas=deltas) -> None:
            assert text, "an empty piece"
            deltas[row] += text

        assert backend.complete(conversations, pictures, settings, per_row, collect) == answers, stops
        assert deltas == [answer.text for answer in answers], stops
        for full, answer in zip(reference, answers, strict=True):
            text, stopped = cut_at_stops(full.text, stops)
            assert (answer.text, answer.finish_reason) == (text, "stop" if stopped else "length"), stops
        streamed = "".join(backend.stream(conversations[0], pictures[0], settings, stops))
        assert streamed == answers[0].text, stops


def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    template, special, roles = TEMPLATES[kind]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.chat_template = template
    return tokenizer


def tiny_text_config(
    kind: str, tokenizer: PreTrainedTokenizerFast, init_std: float = 0.02, context: int = 512
):
    common = {
        "initializer_range": init_std,
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": context,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if kind == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if kind == "phi3":
        return Phi3Config(num_key_value_heads=4, **common)
    return LlamaConfig(num_key_value_heads=2, **common)


TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 24,
}


def tiny_vit(size: int = 32):
    """A tiny SigLIP-style ViT (timm's, no CLS token): `size` px images, 8 px patches, 2 blocks."""
    from mmllm.models.timm_vision import describe_architecture

    shape = {"img_size": size, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2}
    return describe_architecture(
        "vit_base_patch16_siglip_224", num_classes=0, model_args=shape, image_size=size
    )


def make_tiny(
    kind: str = "qwen2",
    feature_mode: str = "pooled",
    projector: str = "mlp_ln",
    lm_init_std: float = 0.02,
    vision=None,
    context: int = 512,
    **extra,
):
    """A random tiny MultimodalLM and its processor, seeded so every call gives the same weights.

    A larger `lm_init_std` gives an LM whose outputs react strongly to its inputs, as a trained
    one does (at 0.02 a random LM predicts near-uniformly whatever it is fed). `vision`: another
    tower's config (a tiny CLIP by default). `context`: the tokens the LM reads, prompt and answer.
    """
    torch.manual_seed(0)
    tokenizer = make_tokenizer(kind)
    text_config = tiny_text_config(kind, tokenizer, lm_init_std, context)
    config = MultimodalConfig(
        vision_config=vision or CLIPVisionConfig(**TINY_CLIP),
        text_config=text_config,
        vision_feature_mode=feature_mode,
        projector_type=projector,
        **extra,
    )
    images = image_processor_for(vision) if vision is not None else ImageProcessor(size=32)
    processor = MultimodalProcessor(tokenizer, config.num_image_tokens, images)
    config.image_token_id = processor.image_token_id
    model = MultimodalLM(config).eval()
    return model, processor


@pytest.fixture(params=["qwen2", "phi3", "llama"])
def lm_kind(request) -> str:
    return request.param


@pytest.fixture
def tiny(lm_kind):
    return make_tiny(lm_kind)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Two small photos drawn with PIL, saved as files."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (shape, colour) in enumerate([("ellipse", "red"), ("rectangle", "blue")]):
        image = Image.new("RGB", (64, 48), "white")
        getattr(ImageDraw.Draw(image), shape)([10, 8, 50, 40], fill=colour)
        paths.append(folder / f"img{i}.png")
        image.save(paths[-1])
    return paths


def generate_texts(pipeline, prompts: list, settings) -> list[str]:
    """The answers transformers' own `generate` gives: what the torch backend's sessions must match."""
    from mmllm.engine.rows import RowTracker

    rows = RowTracker(pipeline.processor, [settings] * len(prompts), [[] for _ in prompts])
    return [c.text for c in rows.completions(pipeline.decode_with_generate(prompts, settings, rows))]
