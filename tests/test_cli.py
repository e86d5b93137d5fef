"""The `mmllm` command on a saved tiny model: answers, streams, explains itself, fails cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import make_tiny
from mmllm.cli import main
from mmllm.pipeline import GenerationSettings, Pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, processor = make_tiny("qwen2", feature_mode="patch")
    model.config.trained_parts = ["language_model"]
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_ask_prints_the_pipeline_answer(model_dir, images, capsys):
    question = "What is in this image?"
    assert main(["ask", str(images[0]), question, "--model", str(model_dir), "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    expected = Pipeline.load(str(model_dir)).ask(images[0], question, GenerationSettings(max_new_tokens=12))
    assert captured.out == expected + "\n"
    assert "vision_tower and projector untrained" in captured.err


def test_stream_gives_the_same_greedy_answer(model_dir, images, capsys):
    common = ["ask", str(images[0]), "What shape?", "--model", str(model_dir), "--max-new-tokens", "6"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--stream"]) == 0
    assert capsys.readouterr().out.strip() == plain.strip()


def test_caption_and_beams(model_dir, images, capsys):
    args = [
        "caption",
        *map(str, images),
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "4",
        "--num-beams",
        "2",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]


def test_info_lists_parts_and_training_state(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "patch (16 tokens/image, 32-d)" in out
    assert "language_model" in out and "trained" in out and "UNTRAINED" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "{img}", "   "], "the question is empty"),
        (["ask", "/no/such.png", "hi"], "no such file"),
        (["ask", "{bad}", "hi"], "not an image file"),
        (["ask", "{img}", "hi", "--model", "not-a-model"], "unknown model 'not-a-model'"),
        (["ask", "{img}", "hi", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        (["weights", "install", "nope"], "unknown weights 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(model_dir, images, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    args = [a.format(img=images[0], bad=bad) for a in args]
    if args[0] == "ask" and "--model" not in args:
        args += ["--model", str(model_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmllm: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_console_script_exit_code(images):
    result = subprocess.run(
        [sys.executable, "-m", "mmllm.cli", "ask", str(images[0]), ""], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "mmllm: error: the question is empty"
