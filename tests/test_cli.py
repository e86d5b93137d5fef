"""The `mmllm` command on a saved tiny model: answers, streams, explains itself, fails cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mmllm
from conftest import make_tiny
from mmllm.cli import main
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline


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
    assert captured.out == expected.strip() + "\n"  # the answer as generated, trimmed for the terminal
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
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    expected = Pipeline.load(str(model_dir)).caption(
        images, GenerationSettings(max_new_tokens=4, num_beams=2)
    )
    assert [line.split("\t", 1)[1] for line in lines] == [caption.strip() for caption in expected]


def test_info_lists_parts_and_training_state(model_dir, capsys):
    assert main(["info", "--model", str(model_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"model: {model_dir}"
    assert main(["info"]) == 2 and "which model?" in capsys.readouterr().err
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
        # Settings are checked before the model is looked for: an unknown model is not what is reported.
        (
            ["ask", "{img}", "hi", "--max-new-tokens", "-5", "--model", "nope"],
            "max_new_tokens must be at least",
        ),
        (["ask", "{img}", "hi", "--top-p", "0", "--model", "nope"], "top_p must be in (0, 1]"),
        (["ask", "{img}", "hi", "--seed", str(2**70), "--model", "nope"], "seed must be in"),
        (["ask", "{img}", "hi", "--temperature", "nan", "--model", "nope"], "temperature must be in"),
        (["caption", "{img}", "--model", "nope", "--max-new-tokens", "0"], "max_new_tokens must be at least"),
        (["serve", "--model", "nope", "--max-batch-size", "0"], "max_batch_size must be positive"),
        (["serve", "--model", "nope", "--port", "70000"], "port must be in 0..65535"),
        (["ask", "{img}", "hi " * 2000], "tokens; the model's context holds 512"),
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


def test_version_and_every_help_start_without_torch_or_transformers():
    """What keeps `mmllm --help` under half a second: the parser, help text from the dataclasses
    included, imports none of the heavy libraries (benchmarks/startup.py times it)."""
    probe = (
        "import sys; from mmllm.cli import build_parser; build_parser(); "
        "print(sorted({'torch', 'transformers', 'numpy', 'PIL'} & {m.split('.')[0] for m in sys.modules}))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "mmllm", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"mmllm {mmllm.__version__}"
    train_help = subprocess.run(
        [sys.executable, "-m", "mmllm", "train", "--help"], capture_output=True, text=True
    )
    assert train_help.returncode == 0 and "optim.lr_projector" in train_help.stdout  # from TrainConfig


def test_batch_size_must_be_positive(images, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(images[0]), "--batch-size", "0"])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory):
    """A saved tiny model with a LoRA adapter: loading it runs peft, as the shipped default model does."""
    from peft import LoraConfig

    model, processor = make_tiny("llama")
    model.add_lora(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.config.trained_parts = ["vision_tower", "projector", "language_model"]
    folder = tmp_path_factory.mktemp("tiny-lora")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# The CLI with a library that warns while it reads the image.
NOISY_CLI = """
import sys, warnings
from PIL import Image
open_image = Image.open
def warning_open(*args, **kwargs):
    warnings.warn("a library's warning", UserWarning)
    return open_image(*args, **kwargs)
Image.open = warning_open
from mmllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stream", [False, True])
def test_ask_prints_no_third_party_warnings(lora_model_dir, images, stream):
    """stderr holds mmllm's own lines only; `--debug` lets the third-party warnings through."""
    command = [sys.executable, "-m", "mmllm.cli", "ask", str(images[0]), "What is it?"]
    command += ["--model", str(lora_model_dir), "--max-new-tokens", "4", *(["--stream"] if stream else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = Pipeline.load(str(lora_model_dir)).ask(
        images[0], "What is it?", GenerationSettings(max_new_tokens=4)
    )
    assert expected.strip() and result.stdout.strip() == expected.strip()  # the answer, on stdout alone
    foreign = [line for line in result.stderr.splitlines() if not line.startswith("mmllm: ")]
    assert foreign == [], result.stderr
    # A library warning on the way (reading the image), shown with `--debug` only.
    noisy = [sys.executable, "-c", NOISY_CLI, *command[3:]]
    quiet = subprocess.run(noisy, capture_output=True, text=True, timeout=300)
    debug = subprocess.run([*noisy[:3], "--debug", *noisy[3:]], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == debug.returncode == 0, quiet.stderr + debug.stderr
    assert "a library's warning" not in quiet.stderr and "a library's warning" in debug.stderr
