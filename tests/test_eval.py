"""Evaluation: metrics against cases worked out by hand from the official definitions; end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from mmllm.cli import main
from mmllm.eval.report import write_report
from mmllm.eval.runner import metrics_from_predictions
from mmllm.eval.vqa import exact_match, normalize_answer, token_f1, vqa_accuracy, vqa_formula


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),
        ("the cat", "cat"),
        ("An apple", "apple"),
        ("dont", "don't"),
        ("yes!", "yes"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("left-hand", "left hand"),
        ("none", "0"),
        ("  Ten\n", "10"),
    ],
)
def test_answer_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_by_hand():
    # 3 of 10 humans said "2": leaving one of them out leaves 2 matches (2/3), leaving out
    # any of the 7 others leaves 3 (capped at 1): (3 x 2/3 + 7 x 1) / 10 = 0.9.
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # "two" normalises to "2"; 2 humans: (2 x 1/3 + 8 x 2/3) / 10 = 0.6.
    assert vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    # One human: (1 x 0 + 9 x 1/3) / 10 = 0.3.
    assert vqa_accuracy("blue", ["blue"] + ["red"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("green", ["red"] * 10) == 0.0
    # The protocol only processes human answers that disagree: ten identical "Two" stay "Two".
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_accuracy("Two", ["two"] * 10) == 0.0
    # Disagreeing answers get punctuation processing: "left-hand" becomes "left hand" on both sides.
    assert vqa_accuracy("left-hand", ["left-hand"] * 4 + ["right"] * 6) == pytest.approx(1.0)
    # ...which turns a trailing "!" into a space that is never stripped: "yes " != "yes".
    assert vqa_accuracy("yes", ["yes!"] * 4 + ["no"] * 6) == 0.0


def test_vqa_accuracy_with_fewer_than_ten_answers():
    # One answer: exact match (the leave-one-out average gave 0 to every prediction).
    assert vqa_accuracy("Red.", ["red"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0
    # n < 10 answers: full credit once min(3, n) of them agree.
    assert vqa_accuracy("2", ["2", "2"]) == 1.0 and vqa_accuracy("2", ["2", "3"]) == 0.5
    assert vqa_accuracy("2", ["2", "3", "3", "3", "2"]) == pytest.approx(2 / 3)
    assert vqa_formula(["a"] * 9) == "fewer answers" and vqa_formula(["a"] * 10) == "official"
    with pytest.raises(ValueError):
        vqa_formula([])


def test_vqa_report_says_which_formula_scored_how_many_questions(tmp_path):
    rows = [
        {"id": "a", "prediction": "red", "answers": ["red"]},
        {"id": "b", "prediction": "two", "answers": ["2"]},
        {"id": "c", "prediction": "no", "answers": ["no"] * 10},
    ]
    metrics = metrics_from_predictions("vqav2", rows)
    assert metrics["vqa_accuracy"] == 1.0 and metrics["token_f1"] == 1.0
    assert {k: v["questions"] for k, v in metrics["vqa_formula"].items()} == {
        "fewer answers": 2,
        "official": 1,
    }
    report = {"task": "vqav2", "model": "m", "samples": 3, "metrics": metrics, "decoding": {}, "timings": {}}
    write_report(report, rows, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| vqa_accuracy formula: fewer answers | 2 questions: min(#matches / min(3, n), 1)" in markdown


def test_spice_is_skipped_offline_with_one_line(monkeypatch, caplog):
    from pycocoevalcap.spice import get_stanford_models as corenlp

    from mmllm.eval.captions import _spice

    if (Path(corenlp.SPICEDIR) / corenlp.SPICELIB / f"{corenlp.JAR}.jar").is_file():
        pytest.skip("Stanford CoreNLP is installed: SPICE runs")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("INFO", logger="mmllm"):
        assert _spice({}, {}) == "unavailable (offline: needs Stanford CoreNLP models from the internet)"
    assert [r.message for r in caplog.records] == [
        "SPICE skipped: offline (HF_HUB_OFFLINE=1) and Stanford CoreNLP is not installed"
    ]


def test_exact_match_and_token_f1():
    assert exact_match("The circle.", "circle") == 1.0 and exact_match("square", "circle") == 0.0
    assert token_f1("red circle", ["circle"]) == pytest.approx(2 / 3)  # p = 1/2, r = 1
    assert token_f1("blue", ["red", "blue"]) == 1.0 and token_f1("x", ["y"]) == 0.0


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_caption_metrics_identical_versus_disjoint():
    from mmllm.eval.captions import caption_metrics

    refs = {
        "1": ["a red circle on a white background", "a red ball"],
        "2": ["a blue square", "a blue box"],
        "3": ["a green triangle on white", "green shape"],
    }
    same = caption_metrics(
        {"1": "a red circle on a white background", "2": "a blue square", "3": "a green triangle on white"},
        refs,
    )
    other = caption_metrics({"1": "zebra giraffe", "2": "purple elephant", "3": "orange hippo"}, refs)
    assert same["BLEU-1"] > 0.99 and same["BLEU-4"] > 0.9 and same["ROUGE-L"] > 0.9 and same["CIDEr"] > 1.0
    assert other["BLEU-1"] < 1e-6 and other["CIDEr"] == 0.0 and other["ROUGE-L"] == 0.0
    assert same["METEOR"] > other["METEOR"]
    if isinstance(same["SPICE"], float):  # Stanford CoreNLP installed: SPICE ranks them too
        assert same["SPICE"] > other["SPICE"]
    else:  # offline without CoreNLP: said, for both, not a number made up
        assert same["SPICE"].startswith("unavailable") and other["SPICE"] == same["SPICE"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, processor = make_tiny("qwen2")
    folder = tmp_path_factory.mktemp("eval-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_easy_vqa_eval_end_to_end_resume_and_recompute(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        "eval",
        "--task",
        "easy-vqa",
        "--model",
        str(model_dir),
        "--data",
        "easy-vqa:test",
        "--out",
        str(out),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "4",
        "datasets=[{format: easy-vqa, split: test, limit: 10}]",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 10 and report["generated_this_run"] == 10
    assert set(report["metrics"]["per_answer_type"]) <= {"yes/no", "color", "shape"}
    assert sum(sum(row.values()) for row in report["metrics"]["confusion"].values()) == 10
    for name in ("report.md", "accuracy_per_type.png", "confusion.png", "lengths.png"):
        assert (out / name).stat().st_size > 0, name
    # Interrupted: the last 4 predictions and half a line lost; the rerun makes only those.
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])
    # ... by a version that did not record the backend yet: its run was a torch run.
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k != "backend"}))
    assert main(args) == 0
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["generated_this_run"] == 4 and resumed["metrics"] == report["metrics"]
    capsys.readouterr()
    assert main(["eval", "--task", "easy-vqa", "--out", str(out), "--from-predictions"]) == 0
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]
    assert "easy-vqa: 10 samples, accuracy" in capsys.readouterr().out


def test_eval_resumes_only_the_run_that_made_the_predictions(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["eval", "--task", "easy-vqa", "--data", "easy-vqa:test", "--out", str(out), "--batch-size", "5"]
    common.append("datasets=[{format: easy-vqa, split: test, limit: 5}]")
    assert main([*common, "--model", str(model_dir), "--max-new-tokens", "3"]) == 0
    first = (out / "predictions.jsonl").read_text()
    capsys.readouterr()
    # Other decoding, or another model, into the same folder: refused, and nothing is overwritten.
    assert main([*common, "--model", str(model_dir), "--max-new-tokens", "8"]) == 2
    error = capsys.readouterr().err
    assert "holds predictions of another run" in error and "decoding" in error and "--overwrite" in error
    assert main([*common, "--model", "default", "--max-new-tokens", "3"]) == 2
    assert f"model: {model_dir} -> default" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_text() == first
    # --overwrite starts fresh; the report then names the run that made its predictions.
    assert main([*common, "--model", str(model_dir), "--max-new-tokens", "8", "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["generated_this_run"] == 5
    assert main(["eval", "--task", "easy-vqa", "--out", str(out), "--from-predictions"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["decoding"]["max_new_tokens"] == 8 and report["model"] == str(model_dir)


def test_eval_does_not_resume_a_model_retrained_under_the_same_path(model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "eval"
    common = ["eval", "--task", "easy-vqa", "--data", "easy-vqa:test", "--out", str(out), "--batch-size", "5"]
    common += ["datasets=[{format: easy-vqa, split: test, limit: 5}]", "--model", str(model)]
    assert main([*common, "--max-new-tokens", "3"]) == 0
    first = json.loads((out / "run.json").read_text())["weights"]
    assert main([*common, "--max-new-tokens", "3"]) == 0  # the same weights resume
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1}, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert main([*common, "--max-new-tokens", "3"]) == 2
    error = capsys.readouterr().err
    assert "holds predictions of another run" in error and f"weights: {first} -> " in error
    # A retuned config.json (a labels model's bridge lives there) is another model too.
    assert main([*common, "--max-new-tokens", "3", "--overwrite"]) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "projector_labels_sure": 0.4}))
    capsys.readouterr()
    assert main([*common, "--max-new-tokens", "3"]) == 2
    error = capsys.readouterr().err
    assert f"settings: {settings} -> " in error and "weights:" not in error


def test_a_task_checks_its_data_before_loading_a_model(tmp_path, capsys):
    args = ["eval", "--task", "coco-captions", "--model", "no-such-model", "--data", "easy-vqa:test"]
    assert main([*args, "--out", str(tmp_path), "datasets=[{format: easy-vqa, split: test, limit: 3}]"]) == 2
    error = capsys.readouterr().err
    assert "--task coco-captions needs references for every sample; 3 of 3 have none" in error
    assert not (tmp_path / "predictions.jsonl").exists()


def test_perplexity_task(model_dir, tmp_path):
    out = tmp_path / "ppl"
    assert (
        main(
            [
                "eval",
                "--task",
                "perplexity",
                "--model",
                str(model_dir),
                "--data",
                "easy-vqa:test",
                "--out",
                str(out),
                "datasets=[{format: easy-vqa, split: test, limit: 3}]",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    import math

    expected = math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
    assert report["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    # A random LM over ~400 tokens is roughly uniform: perplexity near the vocabulary size.
    assert 100 < report["metrics"]["perplexity"] < 2000


def test_eval_errors(tmp_path, capsys):
    assert main(["eval", "--task", "easy-vqa", "--out", str(tmp_path), "--from-predictions"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_vqav2_and_coco_caption_tasks_end_to_end(model_dir, tmp_path):
    from test_data import coco_file, draw, vqa_files

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        draw(images / f"img{i}.png", colour)
    spec = vqa_files(tmp_path, images)
    data = [
        "--data",
        f"vqav2:{spec.path}",
        "--images",
        str(images),
        f"datasets=[{{format: vqav2, path: {spec.path}, images: {images}, annotations: {spec.annotations}}}]",
    ]
    assert (
        main(
            [
                "eval",
                "--task",
                "vqav2",
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "vqa"),
                "--max-new-tokens",
                "2",
                *data,
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "vqa" / "report.json").read_text())["metrics"]
    assert set(metrics["per_answer_type"]) == {"other", "yes/no", "number"}
    assert metrics["per_question_type"]["what color"]["count"] == 3
    if shutil.which("java") is None:
        return
    captions = coco_file(tmp_path)
    assert (
        main(
            [
                "eval",
                "--task",
                "coco-captions",
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "cap"),
                "--data",
                f"coco:{captions}",
                "--images",
                str(images),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "cap" / "report.json").read_text())
    assert report["samples"] == 2 and {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"} <= set(
        report["metrics"]
    )


def test_missing_java_is_a_clear_error(tmp_path, monkeypatch):
    from mmllm.errors import MmllmError
    from mmllm.eval.captions import caption_metrics

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MmllmError, match="need Java"):
        caption_metrics({"1": "a cat"}, {"1": ["a cat"]})


def test_yes_no_by_true_answer_exposes_a_model_that_reads_only_the_wording(tmp_path):
    def row(question_type: str, truth: str, prediction: str) -> dict:
        return {"answers": [truth], "prediction": prediction, "question_type": question_type}

    always_no = [row("is there a COLOR shape?", truth, "no") for truth in ["no"] * 8 + ["yes"] * 2]
    looks = [row("is there not a SHAPE?", "yes", "Yes."), row("is there not a SHAPE?", "no", "yes")]
    metrics = metrics_from_predictions(
        "easy-vqa", [*always_no, *looks, row("what color is it?", "red", "red")]
    )
    assert metrics["accuracy"] == pytest.approx(10 / 13)
    sides = metrics["per_question_type_yes_no"]
    assert set(sides) == {"is there a COLOR shape?", "is there not a SHAPE?"}  # open questions left out
    assert sides["is there a COLOR shape?"] == {
        "no": {"accuracy": 1.0, "count": 8},
        "yes": {"accuracy": 0.0, "count": 2},
    }
    assert sides["is there not a SHAPE?"]["yes"]["accuracy"] == 1.0
    assert sides["is there not a SHAPE?"]["no"]["accuracy"] == 0.0
    report = {
        "task": "easy-vqa",
        "model": "m",
        "samples": 13,
        "metrics": metrics,
        "decoding": {},
        "timings": {},
    }
    write_report(report, [], tmp_path)
    assert "| is there a COLOR shape? | 0.0000 | 2 | 1.0000 | 8 |" in (tmp_path / "report.md").read_text()


def test_perplexity_renders_prompts_as_the_model_was_trained(tmp_path, images):
    """A model trained in the `plain` format is scored on plain text, as it answers: the eval data's
    own (default) conversation_format must not re-render it with the chat template."""
    from mmllm.processor import ALIGN_TEMPLATE

    model, processor = make_tiny("qwen2")
    plain = processor.with_template(ALIGN_TEMPLATE)
    model.save_pretrained(tmp_path / "m")
    plain.save_pretrained(tmp_path / "m")
    conversation = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A red square."},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "image": str(images[0]), "conversations": conversation}) + "\n")
    out = tmp_path / "ppl"
    perplexity = ["eval", "--task", "perplexity", "--data", f"jsonl:{data}", "--out", str(out)]
    assert main([*perplexity, "--model", str(tmp_path / "m")]) == 0
    row = json.loads((out / "predictions.jsonl").read_text())
    batch = plain([conversation], [[images[0]]], train=True, padding_side="right")
    with torch.no_grad():
        loss = model(**batch).loss
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert row["tokens"] == tokens
    assert row["nll"] == pytest.approx(float(loss) * tokens, rel=1e-4)
