"""Fast decoding: the static-cache session (`--compile on`) answers what transformers' generate and
the eager session answer, compiles a bounded number of graphs (shape buckets), and a second call
compiles nothing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import generate_texts, make_tiny
from mmllm.engine import load_backend
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.static_session import StaticSession
from mmllm.engine.torch_backend import Pipeline
from mmllm.errors import MmllmError

QUESTIONS = ["What is it?", "Describe the picture " + "in many words " * 40 + "please.", "Colour?", "Why?"]


def prompts_of(pipeline: Pipeline) -> list:
    """Prompts of 1 to 3 chunks, with and without an image."""
    colours = ["red", "blue", "green", "white"]
    return [
        pipeline.prepare([{"role": "user", "content": ("<image>\n" if n % 2 == 0 else "") + q}], images)
        for n, q in enumerate(QUESTIONS)
        for images in [[Image.new("RGB", (40, 30), colours[n])] if n % 2 == 0 else []]
    ]


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Dynamo keeps compiled graphs per function, across sessions: each test starts with none, so
    no test meets the graph limit because of the sessions before it."""
    torch._dynamo.reset()


class CountingCompiler:
    """A torch.compile backend that runs each captured graph as it is and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_static_decoding_gives_the_greedy_answers_of_generate(kind):
    model, processor = make_tiny(kind, feature_mode="patch", lm_init_std=0.3)
    static = Pipeline(model, processor, compiler="eager")
    # Two slots for four prompts: rows take freed slots while another decodes, and steps run over
    # one and two slots.
    static.__dict__["session"] = StaticSession(model, static.embed_prompt, slots=2, compiler="eager")
    prompts = prompts_of(static)
    assert len(prompts[1].input_ids) > 256  # read in two chunks
    settings = GenerationSettings(max_new_tokens=12, ignore_eos=True)
    reference = generate_texts(static, prompts, settings)
    answers = static.complete_prompts(prompts, settings)
    assert [c.text for c in answers] == reference
    assert [c.text for c in Pipeline(model, processor).complete_prompts(prompts, settings)] == reference
    assert not static.session.rows_held


def test_recompiles_are_bounded_and_a_second_call_compiles_nothing():
    model, processor = make_tiny("qwen2", lm_init_std=0.3)
    pipeline = Pipeline(model, processor, compiler="eager")
    counting = CountingCompiler()
    session = StaticSession(model, pipeline.embed_prompt, slots=4, compiler=counting)
    pipeline.__dict__["session"] = session  # what the backend decodes on
    prompts = prompts_of(pipeline)
    settings = GenerationSettings(max_new_tokens=6, ignore_eos=True)
    pipeline.complete_prompts(prompts, settings)
    first = counting.graphs  # decode: batch x width buckets met; prefill: chunk x width
    bound = len(session.widths) * (len(session.batch_sizes) + len(session.chunks))
    assert 0 < first <= bound
    pipeline.complete_prompts(prompts, settings)
    assert counting.graphs == first
    # One row alone runs in the smallest batch bucket, compiled once; another prompt and answer of
    # lengths within the same buckets compile nothing more.
    ask = [pipeline.prepare([{"role": "user", "content": q}]) for q in ("How?", "Who is it?")]
    pipeline.complete_prompts(ask[:1], GenerationSettings(max_new_tokens=9, ignore_eos=True))
    alone = counting.graphs
    assert alone <= first + 2
    pipeline.complete_prompts(ask[1:], GenerationSettings(max_new_tokens=4, ignore_eos=True))
    assert counting.graphs == alone


def test_compile_setting(tmp_path):
    model, processor = make_tiny("qwen2")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert Pipeline.load(str(tmp_path), device="cpu").compiler is None  # auto: eager on a CPU
    compiled = Pipeline.load(str(tmp_path), device="cpu", compile="on")
    assert compiled.compiler == "inductor" and isinstance(compiled.session, StaticSession)
    assert Pipeline.load(str(tmp_path), device="cpu", compile="off").compiler is None
    with pytest.raises(MmllmError, match="compile"):
        Pipeline.load(str(tmp_path), compile="always")
    with pytest.raises(MmllmError, match="torch backend"):
        load_backend("llama.cpp", str(tmp_path), compile="on")


@pytest.mark.slow
def test_inductor_compiled_decoding_matches_generate():
    model, processor = make_tiny("qwen2", lm_init_std=0.3)
    pipeline = Pipeline(model, processor, compiler="inductor")
    prompts = prompts_of(pipeline)[:1]
    settings = GenerationSettings(max_new_tokens=10, ignore_eos=True)
    reference = generate_texts(pipeline, prompts, settings)
    for _ in range(2):  # compiled once, then replayed
        assert [c.text for c in pipeline.complete_prompts(prompts, settings)] == reference
