"""Documents, prompts and scores for mmllm's local lmms-eval tasks (see README.md beside this file).

Runs inside lmms-eval's own environment: it imports lmms-eval, never mmllm.
"""

from __future__ import annotations

from lmms_eval.tasks.vqav2.utils import vqav2_process_results

# VQAv2's scorer leaves each of ten annotators' answers out in turn: with one answer every prediction
# scores 0. It leaves out every answer *equal* to the left-out one, so each carries its annotator's id,
# as VQAv2's answers do.
ANNOTATORS = 10


def doc_to_visual(doc: dict) -> list[str]:
    return [doc["image"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0]


def image_first_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    """The order mmllm's models were trained on: the image, then the question."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": doc["image"]},
                {"type": "text", "text": doc_to_text(doc, lmms_eval_specific_kwargs)},
            ],
        }
    ]


def vqa_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lmms-eval's own VQAv2 scoring (EvalAI normalisation), against each accepted answer as if all ten
    annotators had given it; the best match counts (photo-qa lists alternatives: cat, kitten, tabby)."""
    scores = [
        vqav2_process_results(
            {
                "question_id": doc["id"],
                "answers": [{"answer": answer, "answer_id": i} for i in range(ANNOTATORS)],
            },
            results,
        )["exact_match"]
        for answer in doc["answers"]
    ]
    return {"vqa_accuracy": max(scores)}
