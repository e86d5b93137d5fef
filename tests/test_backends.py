"""Every backend behind one interface: the ONNX Runtime backend ends each row as the PyTorch one does
(token limits, stop strings, cancellation), streams, and runs `ask`, `caption`, `eval` and a live
`serve` from the same commands."""

from __future__ import annotations

import json
from dataclasses import replace

import httpx
import pytest

from conftest import (
    check_streams_and_cancels,
    check_streams_equal_answers,
    easy_vqa_predictions,
    save_tiny,
    serving,
)
from mmllm.cli import main
from mmllm.engine import load_backend
from mmllm.engine.onnx import ONNX_CONFIG, OnnxBackend
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline
from mmllm.errors import MmllmError
from mmllm.export.onnx import export_onnx

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    model = save_tiny(root / "model", lm_init_std=0.3, projector_snap_to_vocab=True)
    export_onnx(str(model), root / "onnx")
    return model, root / "onnx"


@pytest.fixture(scope="module")
def backends(exported):
    model, onnx = exported
    return Pipeline.load(str(model), device="cpu"), OnnxBackend.load(onnx)


def rows(images):
    conversations = [
        [{"role": "user", "content": "<image>\nWhat is it?"}],
        [{"role": "user", "content": "A longer question without an image, about colours?"}],
        [{"role": "user", "content": "<image>\nAnd this one?"}],
    ]
    return conversations, [[images[0]], [], [images[1]]]


def test_rows_end_alike_on_every_backend(backends, images):
    torch_backend = backends[0]
    conversations, pictures = rows(images)
    settings = GenerationSettings(max_new_tokens=12)
    reference = torch_backend.complete(conversations, pictures, settings)
    # A stop string from inside the first answer, and a shorter limit for the last row.
    stop = [[reference[0].text[2:4]], [], []]
    limits = [settings, settings, replace(settings, max_new_tokens=3)]
    for backend in backends:
        assert backend.complete(conversations, pictures, settings) == reference, backend.name
    alike = [b.complete(conversations, pictures, limits, stop=stop) for b in backends]
    assert alike[0] == alike[1]
    assert alike[0][0].finish_reason == "stop" and alike[0][2].finish_reason == "length"
    assert alike[0][2].completion_tokens == 3


def test_onnx_streams_and_cancels(backends, images):
    check_streams_and_cancels(backends[1], images[0])


def test_onnx_streams_equal_answers(backends, images):
    conversations, pictures = rows(images)
    check_streams_equal_answers(backends[1], conversations[:2], pictures[:2])


def test_onnx_refuses_what_it_cannot_do(exported, tmp_path):
    _, onnx = exported
    with pytest.raises(ValueError, match="num_beams"):
        OnnxBackend.load(onnx).check(GenerationSettings(num_beams=2))
    with pytest.raises(MmllmError, match="runs on the CPU"):
        load_backend("onnx", str(onnx), device="cuda")
    old = tmp_path / "old"
    old.mkdir()
    for item in onnx.iterdir():
        (old / item.name).symlink_to(item)
    (old / ONNX_CONFIG).unlink()
    settings = json.loads((onnx / ONNX_CONFIG).read_text())
    (old / ONNX_CONFIG).write_text(json.dumps({k: v for k, v in settings.items() if k != "format"}))
    with pytest.raises(MmllmError, match="export it again"):
        OnnxBackend.load(old)


def test_every_command_runs_on_the_onnx_backend(exported, images, tmp_path, capsys):
    model, onnx = exported
    ask = [str(images[0]), "What is it?", "--max-new-tokens", "6"]
    assert main(["ask", *ask, "--model", str(model)]) == 0
    torch_answer = capsys.readouterr().out
    assert main(["ask", *ask, "--model", str(onnx), "--backend", "onnx", "--stream"]) == 0
    assert capsys.readouterr().out == torch_answer
    assert main(["caption", str(images[0]), str(images[1]), "--model", str(onnx), "--backend", "onnx"]) == 0
    captions = capsys.readouterr().out.strip().split("\n")  # a random model's text may hold other breaks
    assert [line.split("\t")[0] for line in captions] == [str(images[0]), str(images[1])]
    assert main(["ask", *ask, "--model", str(onnx), "--backend", "onnx", "--num-beams", "2"]) == 2
    assert "num_beams" in capsys.readouterr().err
    predictions = [
        easy_vqa_predictions(tmp_path / b, path, b) for b, path in (("torch", model), ("onnx", onnx))
    ]
    assert predictions[0] == predictions[1] and len(predictions[0]) == 6
    perplexity = ["eval", "--task", "perplexity", "--backend", "onnx", "--data", "easy-vqa:test"]
    assert main([*perplexity, "--model", str(onnx), "--out", str(tmp_path / "ppl")]) == 2
    assert "--backend torch" in capsys.readouterr().err


def test_serve_on_the_onnx_backend(exported):
    model, onnx = exported
    body = {"messages": [{"role": "user", "content": "What colour is it?"}], "max_tokens": 6}
    answers = {}
    for options in ((str(model),), (str(onnx), "--backend", "onnx")):
        with serving(*options) as url:
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            answers[options[-1]] = reply.json()["choices"][0]["message"]["content"]
            if options[-1] == "onnx":
                beams = httpx.post(f"{url}/generate", json={"prompt": "Hi", "num_beams": 2}, timeout=60)
                assert beams.status_code == 400 and "num_beams" in beams.json()["error"]["message"]
                assert httpx.get(f"{url}/health", timeout=10).json()["vision_trained"] is False
    assert answers["onnx"] == answers[str(model)]
