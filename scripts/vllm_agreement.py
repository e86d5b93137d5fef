"""The shipped models' greedy answers in vLLM (through mmllm's plugin) against mmllm's torch backend.

    python scripts/vllm_agreement.py [--easy-vqa 500] [--out benchmarks/results]

mmllm-easyvqa answers the first N easy-VQA test questions, mmllm-photo the 48 photo-qa questions, in
fp32 in both engines (on a CPU, vLLM's bf16 is emulated and slower). Each model is exported with
`mmllm export vllm`; vLLM runs in .venv-vllm (`make install-vllm`). Every answer that differs is listed
with where the two first part: torch's log-probabilities of its own token and of vLLM's there (a near
tie, or not). Writes vllm_agreement.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline
from mmllm.export.vllm import export_vllm
from mmllm.images import load_image
from mmllm.samples import easy_vqa_package
from mmllm.vllm_plugin.offline import ENGINE_ENV

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MAX_TOKENS = 32
BATCH = 16


def easy_vqa_questions(count: int) -> list[tuple[str, str]]:
    """(image file, question) of the first `count` easy-VQA test questions."""
    easy_vqa = easy_vqa_package()
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [(paths[i], q) for q, i in list(zip(questions, image_ids, strict=True))[:count]]


def photo_qa_questions(folder: Path) -> list[tuple[str, str]]:
    """(image file, question) of data/photo-qa; `sample:` photos written out as PNG for vLLM to open."""
    rows = [json.loads(line) for line in (ROOT / "data" / "photo-qa" / "questions.jsonl").open()]
    files = {}
    for row in rows:
        if row["image"] not in files:
            files[row["image"]] = folder / f"{len(files)}.png"
            load_image(row["image"]).save(files[row["image"]])
    return [(str(files[row["image"]]), row["question"]) for row in rows]


def first_difference(pipeline: Pipeline, prompt, tokens: list[int]) -> dict | None:
    """Where torch's greedy choice first differs from vLLM's tokens, fed vLLM's tokens: the position,
    and torch's log-probabilities of both choices there."""
    model = pipeline.model
    with torch.inference_mode():
        answer = model.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))
        embeds = torch.cat([pipeline.embed_prompt(prompt), answer], dim=1)
        logits = model.language_model(inputs_embeds=embeds).logits[0, len(prompt.input_ids) - 1 :]
    logprobs = logits.float().log_softmax(-1)
    for position, token in enumerate(tokens):
        ours = int(logprobs[position].argmax())
        if ours != token:
            decode = pipeline.processor.tokenizer.decode
            return {
                "position": position,
                "torch_token": decode([ours]),
                "vllm_token": decode([token]),
                "torch_logprob": round(float(logprobs[position, ours]), 4),
                "vllm_token_torch_logprob": round(float(logprobs[position, token]), 4),
            }
    return None


def compare(name: str, questions: list[tuple[str, str]], work: Path) -> dict:
    pipeline = Pipeline.load(name, device="cpu", dtype="fp32", compile="off")
    conversations = [[{"role": "user", "content": f"<image>\n{q}"}] for _, q in questions]
    prompts = [pipeline.prepare(c, [image]) for c, (image, _) in zip(conversations, questions, strict=True)]
    settings = GenerationSettings(max_new_tokens=MAX_TOKENS)
    torch_answers = [
        completion.text
        for start in range(0, len(prompts), BATCH)
        for completion in pipeline.complete_prompts(prompts[start : start + BATCH], settings)
    ]
    folder = export_vllm(name, work / name)
    render = pipeline.processor.render
    requests = [
        {"prompt": render(c, add_generation_prompt=True), "images": [image]}
        for c, (image, _) in zip(conversations, questions, strict=True)
    ]
    spec, out = work / f"{name}.json", work / f"{name}-answers.json"
    engine = {"dtype": "float32", "max_model_len": 1024}
    spec.write_text(
        json.dumps(
            {
                "engine": engine,
                "models": [{"path": str(folder), "requests": requests, "max_tokens": MAX_TOKENS}],
            }
        )
    )
    command = [str(VLLM_PYTHON), "-m", "mmllm.vllm_plugin.offline", str(spec), str(out)]
    subprocess.run(command, env=os.environ | ENGINE_ENV, check=True)
    [result] = json.loads(out.read_text())
    if "error" in result:
        raise SystemExit(f"{name}: vLLM failed: {result['error']}")
    differences = []
    for (image, question), prompt, ours, theirs in zip(
        questions, prompts, torch_answers, result["answers"], strict=True
    ):
        if ours.strip() != theirs["text"].strip() or prompt.input_ids != theirs["prompt_token_ids"]:
            differences.append(
                {
                    "image": Path(image).name,
                    "question": question,
                    "torch": ours,
                    "vllm": theirs["text"],
                    "same_prompt": prompt.input_ids == theirs["prompt_token_ids"],
                    "first_difference": first_difference(pipeline, prompt, theirs["token_ids"]),
                }
            )
    return {"model": name, "questions": len(questions), "differences": differences}


def markdown(report: dict) -> str:
    lines = [
        "# vLLM vs mmllm's torch backend: greedy answers",
        "",
        f"`python scripts/vllm_agreement.py --easy-vqa {report['easy_vqa']}`: vLLM {report['vllm']} "
        "(CPU build) "
        f"through mmllm's plugin, fp32 in both engines, up to {MAX_TOKENS} tokens an answer.",
        "",
        "| model | questions | identical answers | differences |",
        "|---|---|---|---|",
    ]
    for model in report["models"]:
        same = model["questions"] - len(model["differences"])
        lines.append(f"| {model['model']} | {model['questions']} | {same} | {len(model['differences'])} |")
    for model in report["models"]:
        for diff in model["differences"]:
            where = diff["first_difference"]
            detail = (
                f"first differs at token {where['position']}: torch {where['torch_token']!r} "
                f"(logprob {where['torch_logprob']}) vs vLLM {where['vllm_token']!r} "
                f"(torch logprob {where['vllm_token_torch_logprob']})"
                if where
                else "torch's greedy choices agree with vLLM's tokens throughout"
            )
            prompt = "" if diff["same_prompt"] else " (prompts differ)"
            lines.append(
                f"- {model['model']}, {diff['image']} {diff['question']!r}: torch {diff['torch']!r}, "
                f"vLLM {diff['vllm']!r}{prompt}; {detail}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--easy-vqa", type=int, default=500, help="easy-VQA test questions to ask")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    version = subprocess.run(
        [str(VLLM_PYTHON), "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "photos").mkdir()
        models = [
            compare("mmllm-easyvqa", easy_vqa_questions(args.easy_vqa), work),
            compare("mmllm-photo", photo_qa_questions(work / "photos"), work),
        ]
    report = {
        "vllm": version,
        "easy_vqa": args.easy_vqa,
        "dtype": "float32",
        "max_tokens": MAX_TOKENS,
        "models": models,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_agreement.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "vllm_agreement.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
