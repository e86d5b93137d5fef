"""Answer a JSON file of requests with vLLM's offline `LLM` API, one model after another in one process:
`python -m mmllm.vllm_plugin.offline SPEC.json OUT.json` (what tests/test_vllm.py and
scripts/vllm_agreement.py run in vLLM's environment).

SPEC: {"engine": {LLM keyword arguments}, "models": [{"path": FOLDER, "max_tokens": N, "logprobs": K,
"requests": [{"prompt": TEXT with one <image> per image, "images": [FILE, ...]}]}]}.
OUT: per model, per request: the prompt's token ids after vLLM's processing, the greedy answer's token
ids, text and the logprob of each chosen token; or the model's one-line error.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

# For a caller that starts this module: the engine in this process (no engine-core subprocess), 1 GiB of
# KV cache (vLLM's CPU default takes most of the machine's memory), both cores (by default vLLM keeps one
# for its front end), and no hub.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
}


def answer(path: str, requests: list[dict], max_tokens: int, logprobs: int, engine: dict) -> list[dict]:
    from PIL import Image
    from vllm import LLM, SamplingParams

    most_images = max((len(r["images"]) for r in requests), default=0)
    llm = LLM(path, enforce_eager=True, limit_mm_per_prompt={"image": max(most_images, 1)}, **engine)
    try:
        inputs = [
            {"prompt": r["prompt"], "multi_modal_data": {"image": [Image.open(f) for f in r["images"]]}}
            if r["images"]
            else {"prompt": r["prompt"]}
            for r in requests
        ]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs)
        results = llm.generate(inputs, params, use_tqdm=False)
        return [
            {
                "prompt_token_ids": list(result.prompt_token_ids),
                "token_ids": list(result.outputs[0].token_ids),
                "text": result.outputs[0].text,
                "logprobs": [
                    step[token].logprob
                    for step, token in zip(
                        result.outputs[0].logprobs, result.outputs[0].token_ids, strict=True
                    )
                ],
            }
            for result in results
        ]
    finally:
        del llm
        gc.collect()


def main(spec_path: str, out_path: str) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    with open(spec_path) as file:
        spec = json.load(file)
    results: list[dict[str, Any]] = []
    for model in spec["models"]:
        try:
            answers = answer(
                model["path"],
                model["requests"],
                model["max_tokens"],
                model.get("logprobs", 1),
                spec["engine"],
            )
            results.append({"answers": answers})
        except Exception as err:  # one model's failure (a bad folder) is that model's result
            results.append({"error": f"{type(err).__name__}: {err}".splitlines()[0]})
        cleanup_dist_env_and_memory()
    with open(out_path, "w") as out:
        json.dump(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
