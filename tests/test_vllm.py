"""vLLM: mmllm's plugin (`mmllm.vllm_plugin`) in vLLM's real CPU engine, from its own environment
(`make install-vllm` makes .venv-vllm): every design's first tokens against mmllm's torch backend, the
shipped models' greedy answers, the OpenAI server with streaming, and a llava-hf export."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import engine_python, free_port, make_tiny, start_server, tiny_vit
from mmllm import MultimodalLM
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline
from mmllm.errors import MmllmError
from mmllm.export.vllm import check_language_model, export_vllm
from mmllm.models.timm_vision import describe_architecture
from mmllm.vllm_plugin.offline import ENGINE_ENV

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ENGINE = {"dtype": "float32", "max_model_len": 512}
# fp32 in both engines; vLLM's CPU kernels (fused QKV, its own attention) sum in another order.
LOGPROB_TOLERANCE = 2e-3
FIRST_TOKENS = 4

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(autouse=True)
def vllm_installed() -> None:
    """A skip without .venv-vllm; in CI (MMLLM_REQUIRE_ENGINES), a failure."""
    engine_python(".venv-vllm", "install-vllm")


# Each design option at least once: CLIP and timm towers; pooled, patch and classes features; the three
# projectors; pixel shuffle, snapping to words, CLS; the three LM families.
CLASSIFIER = {"vision": "classifier", "feature_mode": "classes"}
DESIGNS = {
    "clip-pooled-mlp_ln-qwen2": ("qwen2", {}),
    "clip-patch-cls-mlp_gelu-llama": (
        "llama",
        {"feature_mode": "patch", "projector": "mlp_gelu", "vision_use_cls": True},
    ),
    "clip-shuffle-snap-phi3": (
        "phi3",
        {"feature_mode": "patch", "vision_pixel_shuffle": 2, "projector_snap_to_vocab": True},
    ),
    "timm-patch-mlp_ln-qwen2": ("qwen2", {"vision": "vit", "feature_mode": "patch"}),
    "timm-classes-mlp_gelu-llama": ("llama", {**CLASSIFIER, "projector": "mlp_gelu"}),
    "timm-labels-qwen2": ("qwen2", {**CLASSIFIER, "projector": "labels"}),
}
TOWERS = {"vit": tiny_vit, "classifier": lambda: describe_architecture("test_efficientnet", image_size=64)}


def vllm_tiny(kind: str, vision: str | None = None, **design) -> tuple[MultimodalLM, object]:
    """`make_tiny` with two attention heads of 32 in place of four of 16: vLLM's CPU attention takes
    head sizes from 32 up. The projections keep their shapes (one KV head of 32 for two of 16)."""
    model, processor = make_tiny(kind, lm_init_std=0.3, vision=TOWERS[vision]() if vision else None, **design)
    text = model.config.text_config
    text.head_dim, text.num_attention_heads, text.num_key_value_heads = 32, 2, 1
    torch.manual_seed(0)
    return MultimodalLM(model.config).eval(), processor


def run_vllm(models: list[dict], tmp: Path, engine: dict = ENGINE) -> list[dict]:
    """Answer each model's requests in vLLM's offline engine, all models in one process."""
    spec, out = tmp / "spec.json", tmp / "answers.json"
    spec.write_text(json.dumps({"engine": engine, "models": models}))
    command = [str(VLLM_PYTHON), "-m", "mmllm.vllm_plugin.offline", str(spec), str(out)]
    done = subprocess.run(command, env=os.environ | ENGINE_ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(out.read_text())


def conversations(images: list[Path]) -> list[tuple[list[dict], list[Path]]]:
    return [
        ([{"role": "user", "content": "<image>\nWhat is in this image?"}], images[:1]),
        ([{"role": "user", "content": "<image>\n<image>\nWhich shape is red?"}], images[:2]),
    ]


def torch_logprobs(pipeline: Pipeline, prompt, tokens: list[int]) -> list[float]:
    """mmllm's log-probabilities of `tokens` following `prompt`, fed the same tokens (teacher forcing)."""
    model = pipeline.model
    with torch.inference_mode():
        answer = model.get_input_embeddings()(torch.tensor([tokens[:-1]], dtype=torch.long))
        embeds = torch.cat([pipeline.embed_prompt(prompt), answer], dim=1)
        logits = model.language_model(inputs_embeds=embeds).logits[0, len(prompt.input_ids) - 1 :]
    return logits.float().log_softmax(-1)[torch.arange(len(tokens)), tokens].tolist()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, images):
    """Every tiny design saved, exported for vLLM and answered there; plus a saved model vLLM refuses."""
    root = tmp_path_factory.mktemp("vllm")
    saved, models = {}, []
    for name, (kind, design) in DESIGNS.items():
        model, processor = vllm_tiny(kind, **design)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        saved[name] = Pipeline.load(str(root / name), device="cpu", dtype="fp32", compile="off")
        export_vllm(str(root / name), root / f"{name}-vllm")
        requests = [
            {
                "prompt": processor.render(conversation, add_generation_prompt=True),
                "images": list(map(str, pictures)),
            }
            for conversation, pictures in conversations(images)
        ]
        models.append({"path": str(root / f"{name}-vllm"), "requests": requests, "max_tokens": FIRST_TOKENS})
    # A saved model that names its base LM rather than holding it: vLLM must say to export it.
    unexported = {**models[0], "path": str(root / "unexported")}
    model, processor = vllm_tiny("qwen2")
    model.config.text_model_name_or_path = "smollm2-135m-instruct"
    model.save_pretrained(root / "unexported", parts=["projector", "vision_tower"])
    processor.save_pretrained(root / "unexported")
    results = run_vllm([*models, unexported], root)
    return saved, dict(zip([*DESIGNS, "unexported"], results, strict=True))


@pytest.mark.parametrize("design", DESIGNS)
def test_vllm_serves_every_design_as_torch_does(tiny_runs, images, design):
    pipelines, results = tiny_runs
    pipeline, result = pipelines[design], results[design]
    assert "error" not in result, result.get("error")
    for (conversation, pictures), answer in zip(conversations(images), result["answers"], strict=True):
        prompt = pipeline.prepare(conversation, pictures)
        # The same prompt, images expanded alike (a labels model's: to the same words)...
        assert answer["prompt_token_ids"] == prompt.input_ids
        # ...and the same first tokens' log-probabilities.
        expected = torch_logprobs(pipeline, prompt, answer["token_ids"])
        assert len(answer["token_ids"]) == FIRST_TOKENS
        torch.testing.assert_close(answer["logprobs"], expected, atol=LOGPROB_TOLERANCE, rtol=0)


def test_vllm_refuses_a_model_that_is_not_exported(tiny_runs):
    _, results = tiny_runs
    assert "run `mmllm export vllm MODEL OUT`" in results["unexported"]["error"]


def test_export_refuses_what_vllm_cannot_serve(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MmllmError, match="not a saved mmllm model"):
        export_vllm(str(tmp_path), tmp_path / "out")
    model, _ = make_tiny("qwen2")
    model.config.text_config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(MmllmError, match="serves Qwen2ForCausalLM, LlamaForCausalLM, Phi3ForCausalLM"):
        check_language_model(model.config)


def test_shipped_models_answer_in_vllm_as_in_torch(tmp_path):
    """The agreement script on a slice: 20 easy-VQA test questions and the 48 photo-qa questions."""
    command = [
        sys.executable,
        str(ROOT / "scripts" / "vllm_agreement.py"),
        "--easy-vqa",
        "20",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "vllm_agreement.json").read_text())
    assert [m["questions"] for m in report["models"]] == [20, 48]
    assert [m["differences"] for m in report["models"]] == [[], []]


def test_openai_server_streams_the_photo_model(tmp_path, monkeypatch):
    from openai import OpenAI

    out = export_vllm("mmllm-photo", tmp_path / "photo")
    picture = ROOT / "data" / "photo-qa" / "heldout" / "astronaut-flip.jpg"  # upright only through EXIF
    question = "What is in this picture?"
    expected = (
        Pipeline.load("mmllm-photo", device="cpu", dtype="fp32", compile="off")
        .complete(
            [[{"role": "user", "content": question}]], [[picture]], GenerationSettings(max_new_tokens=32)
        )[0]
        .text
    )
    port = free_port()
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(out)]
    command += ["--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    # The server as a user starts it: its engine core in a process of its own.
    for key, value in ENGINE_ENV.items():
        if key != "VLLM_ENABLE_V1_MULTIPROCESSING":
            monkeypatch.setenv(key, value)
    server = start_server(command, f"http://127.0.0.1:{port}/health")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        url = "data:image/jpeg;base64," + base64.b64encode(picture.read_bytes()).decode()
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ]
        ask = {"model": str(out), "messages": messages, "max_tokens": 32, "temperature": 0}
        whole = client.chat.completions.create(**ask).choices[0].message.content
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(**ask, stream=True)
            if chunk.choices
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert whole.strip() == expected.strip()
    assert streamed == whole


def test_a_llava_hf_export_runs_in_vllm(tmp_path, images):
    from mmllm.export.llava_hf import export_llava_hf

    model, processor = vllm_tiny("llama", feature_mode="patch", projector="mlp_gelu")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    export_llava_hf(str(tmp_path / "model"), tmp_path / "llava")
    conversation, pictures = conversations(images)[0]
    request = {
        "prompt": processor.render(conversation, add_generation_prompt=True),
        "images": [str(pictures[0])],
    }
    [result] = run_vllm(
        [{"path": str(tmp_path / "llava"), "requests": [request], "max_tokens": FIRST_TOKENS}], tmp_path
    )
    assert "error" not in result, result.get("error")
    pipeline = Pipeline.load(str(tmp_path / "model"), device="cpu", dtype="fp32", compile="off")
    [answer] = result["answers"]
    expected = torch_logprobs(pipeline, pipeline.prepare(conversation, pictures), answer["token_ids"])
    torch.testing.assert_close(answer["logprobs"], expected, atol=LOGPROB_TOLERANCE, rtol=0)
