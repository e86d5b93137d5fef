"""The cost of the API's logit features per decoding step: what choosing the batch's next tokens takes
with nothing asked (the sampler's fast path), with presence/frequency penalties and a logit_bias, with
logprobs (top 5), with a JSON-schema grammar (llguidance masks for the whole batch in one call), and
with all of them, beside the model's own step, on the same batch at c = 1 and c = 16 rows.

Each configuration decodes the same prompts on the running batch (`RunningRows`, as the server's
scheduler does); the times are medians over the steps where every row decodes (prompts already
read). The grammar is an array of at least 40 strings, so no constrained row ends early.

    python benchmarks/api_features.py [--models default qwen2.5-0.5b-instruct] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import report

from mmllm.engine.rows import RowTracker
from mmllm.engine.running import Row, RunningRows
from mmllm.engine.sampler import sampling_rng
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.tools import json_grammar
from mmllm.engine.torch_backend import Pipeline

QUESTION = "List as many animals as you can, as a JSON array of strings."
LIST = {"type": "array", "items": {"type": "string"}, "minItems": 40}


class TimedSession:
    """A session whose steps are timed; `stepped` says the next choice follows a step."""

    def __init__(self, session):
        self.inner, self.step_s, self.stepped = session, [], False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, handles, tokens):
        start = time.perf_counter()
        logits = self.inner.step(handles, tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_s.append(time.perf_counter() - start)
        self.stepped = True
        return logits


class TimedRows(RunningRows):
    """The running batch, timing each choice of the whole batch's tokens that follows a step."""

    choose_s: list[float]

    def _choose(self, rows, logits):
        start = time.perf_counter()
        super()._choose(rows, logits)
        if self.session.stepped and len(rows) == self.max_rows:
            self.choose_s.append(time.perf_counter() - start)
        self.session.stepped = False


def configurations(steps: int) -> dict[str, GenerationSettings]:
    grammar = json_grammar(LIST)
    free = {"max_new_tokens": steps + 4, "ignore_eos": True}
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {17: 2.0, 42: -5.0}}
    return {
        "off (fast path)": GenerationSettings(**free),
        "penalties + logit_bias": GenerationSettings(**free, **penalties),
        "logprobs (top 5)": GenerationSettings(**free, logprobs=5),
        "grammar (JSON schema)": GenerationSettings(max_new_tokens=steps + 4, grammar=grammar),
        "all": GenerationSettings(max_new_tokens=steps + 4, grammar=grammar, logprobs=5, **penalties),
    }


def run(pipeline: Pipeline, settings: GenerationSettings, rows: int, steps: int) -> tuple[float, float]:
    """Median (model step, choosing) seconds per step over `steps` steps of `rows` rows."""
    prompt = pipeline.prepare([{"role": "user", "content": QUESTION}])
    session = TimedSession(pipeline.session)
    running = TimedRows(session, pipeline.processor.stop_token_ids, rows, shaper=pipeline.shaper)
    running.choose_s = []
    tracker = RowTracker(pipeline.processor, [settings] * rows, [[] for _ in range(rows)])
    for index in range(rows):
        running.add(Row(prompt, tracker, index, sampling_rng(index)))
    while len(running.choose_s) < steps and running.rows:
        running.iterate()
    for row in running.rows:  # leave the session empty for the next run
        session.stop(row.handle)
    if len(running.choose_s) < steps:
        raise RuntimeError(f"rows ended after {len(running.choose_s)} full steps; {steps} asked")
    return statistics.median(session.step_s[-steps:]), statistics.median(running.choose_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "qwen2.5-0.5b-instruct"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--quick", action="store_true", help="the default model, 6 steps")
    args = parser.parse_args()
    models, steps = (["default"], 6) if args.quick else (args.models, args.steps)
    results = []
    for name in models:
        pipeline = Pipeline.load(name, compile="off" if not torch.cuda.is_available() else "auto")
        configs = configurations(steps)
        run(pipeline, configs["off (fast path)"], 1, 2)  # warm-up (and the llguidance vocabulary, once)
        pipeline.shaper.tokenizer  # noqa: B018 (built here, not in a timed step)
        for rows in args.concurrency:
            measured = {label: run(pipeline, settings, rows, steps) for label, settings in configs.items()}
            base_step, base_choose = measured["off (fast path)"]
            for label, (step, choose) in measured.items():
                overhead = choose - base_choose
                results.append(
                    {
                        "model": name,
                        "c": rows,
                        "features": label,
                        "model step ms": f"{step * 1e3:.1f}",
                        "choose ms": f"{choose * 1e3:.2f}",
                        "overhead ms": f"{overhead * 1e3:.2f}",
                        "overhead % of step": f"{overhead / (base_step + base_choose):.1%}",
                    }
                )
    settings = {"steps": steps, "question": QUESTION, "grammar": LIST, "concurrency": args.concurrency}
    report("api_features_quick" if args.quick else "api_features", results, settings)


if __name__ == "__main__":
    main()
