"""Tool calling: OpenAI's `tools` and `tool_choice` (auto, none, required, a named function), tool calls
and results in the conversation, rendered in the chat template's tool format (Qwen2.5's, or the Hermes
one for a template without tools), answers split into content and calls, streamed as OpenAI streams
them; on a live `mmllm serve` with the openai client, and on Qwen2.5-0.5B's real weights (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema_rs
import pytest

from conftest import make_tiny, save_tiny, serving
from mmllm.engine.tools import ToolCallParser, encode_with_tools, merge, parse, template_renders_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
# Arguments a random model fills in a few tokens: no free strings.
LIGHTS = {
    "type": "function",
    "function": {
        "name": "set_lights",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}, "room": {"enum": ["hall", "kitchen"]}},
            "required": ["on", "room"],
            "additionalProperties": False,
        },
    },
}
ANSWER = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris}", "unit": "celsius"}}'
    '\n</tool_call>\n<tool_call>\n{"arguments": {"on": true}, "name": "set_lights"}\n</tool_call>\n'
    "<tool_call>\nnot json\n</tool_call> Done.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Ro'
)


def test_answers_split_into_content_and_calls_alike_whole_or_streamed():
    content, calls = parse(ANSWER)
    assert content == "Let me check.\n\n\n<tool_call>\nnot json\n</tool_call> Done."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Paris}", "unit": "celsius"}'),
        ("set_lights", '{"on": true}'),
        ("get_weather", '{"city": "Ro'),  # cut short by the token limit: what there is
    ]
    for size in (1, 2, 5, 13):
        parser = ToolCallParser()
        deltas = [d for at in range(0, len(ANSWER), size) for d in parser.feed(ANSWER[at : at + size])]
        deltas += parser.finish()
        streamed = merge(deltas)
        assert streamed[0] == content and [c["function"] for c in streamed[1]] == [
            c["function"] for c in calls
        ]
        # A call's name comes first, with its id and no arguments; then its arguments piece by piece.
        first = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
        assert first["function"] == {"name": "get_weather", "arguments": ""} and first["id"].startswith(
            "call_"
        )
    assert parse("  just text \n") == ("just text", [])
    # A bare call, without the tags (as Qwen2.5-0.5B writes them), is a call; bare JSON that is not, text.
    bare = parse(' {"name": "set_lights", "arguments": {"on": true}}\nOK.')
    assert bare[0] == "OK." and bare[1][0]["function"] == {"name": "set_lights", "arguments": '{"on": true}'}
    assert parse('{"on": true}') == ('{"on": true}', [])


def test_templates_render_tools_their_own_way(tmp_path):
    from transformers import AutoTokenizer

    _, processor = make_tiny("qwen2")  # a ChatML template without tools: the Hermes convention
    assert not template_renders_tools(processor)
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": "21 C", "tool_call_id": "call_1"},
    ]
    text = processor.tokenizer.decode(
        encode_with_tools(processor, conversation, 0, None, [WEATHER])["input_ids"]
    )
    assert "<tools>\n" + json.dumps(WEATHER) in text and "<|im_start|>system" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>" in text
    qwen = Path.home() / ".cache/mmllm/weights/qwen2.5-0.5b-instruct"
    if not qwen.is_dir():
        return
    from mmllm.processor import MultimodalProcessor

    real = MultimodalProcessor(AutoTokenizer.from_pretrained(qwen), 4)
    assert template_renders_tools(real)
    ids = encode_with_tools(real, conversation, 0, None, [WEATHER])["input_ids"]
    rendered = real.tokenizer.apply_chat_template(
        conversation, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    assert real.tokenizer.decode(ids) == rendered  # Qwen2.5's own template, as transformers renders it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny(tmp_path_factory.mktemp("tools"), lm_init_std=0.3, context=2048)
    with serving(model, "--max-tokens", "96") as url:
        yield url


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none")


QUESTION = [{"role": "user", "content": "Switch the kitchen lights on."}]


def ask(url: str, stream: bool, messages: list | None = None, **options):
    """The answer's content, tool calls and finish reason, streamed (the chunks merged, as a client
    does) or not."""
    openai = client(url)
    body = {"model": "mmllm", "messages": messages or QUESTION, "max_tokens": 96, "tools": [WEATHER, LIGHTS]}
    body.update(options)
    if not stream:
        choice = openai.chat.completions.create(**body).choices[0]
        calls = [c.model_dump(exclude_none=True) for c in choice.message.tool_calls or ()]
        return choice.message.content, calls, choice.finish_reason
    chunks = list(openai.chat.completions.create(**body, stream=True))
    deltas = []
    for chunk in chunks:
        delta = chunk.choices[0].delta
        if delta.content:
            deltas.append({"content": delta.content})
        if delta.tool_calls:
            deltas.append({"tool_calls": [c.model_dump(exclude_none=True) for c in delta.tool_calls]})
    content, calls = merge(deltas)
    return content, calls, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_tool_choice_forms(server, stream):
    required = ask(server, stream, tool_choice="required", parallel_tool_calls=False)
    named = ask(server, stream, tool_choice={"type": "function", "function": {"name": "set_lights"}})
    for content, calls, finish in (required, named):
        assert finish == "tool_calls" and content is None and len(calls) == 1, (content, calls)
        [call] = calls
        assert call["id"].startswith("call_") and call["type"] == "function"
        tool = {"get_weather": WEATHER, "set_lights": LIGHTS}[call["function"]["name"]]
        assert jsonschema_rs.is_valid(
            tool["function"]["parameters"], json.loads(call["function"]["arguments"])
        )
    assert named[1][0]["function"]["name"] == "set_lights"
    # auto: the model's own choice (a random one writes text); none: no tools in the prompt, no calls.
    auto = ask(server, stream)
    none = ask(server, stream, tool_choice="none")
    assert auto[2] in ("stop", "length", "tool_calls") and none[1] == [] and none[2] in ("stop", "length")
    plain = client(server).chat.completions.create(model="mmllm", messages=QUESTION, max_tokens=96)
    assert none[0] == plain.choices[0].message.content


def test_parallel_required_calls_and_a_conversation_with_results(server):
    openai = client(server)
    several = openai.chat.completions.create(
        model="mmllm", messages=QUESTION, max_tokens=96, tools=[LIGHTS], tool_choice="required"
    )
    calls = several.choices[0].message.tool_calls
    assert calls and all(c.function.name == "set_lights" for c in calls)
    history = [
        *QUESTION,
        several.choices[0].message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": "done"} for c in calls),
    ]
    follow_up = openai.chat.completions.create(model="mmllm", messages=history, max_tokens=8, tools=[LIGHTS])
    assert follow_up.usage.prompt_tokens > several.usage.prompt_tokens
    tokenized = httpx.post(f"{server}/tokenize", json={"messages": history, "tools": [LIGHTS]}).json()
    assert tokenized["count"] == follow_up.usage.prompt_tokens


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [LIGHTS], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [LIGHTS, LIGHTS]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        (
            {"tools": [LIGHTS], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{"}}],
                    },
                    *QUESTION,
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
        ),
        ({"messages": [{"role": "tool", "content": "42"}, *QUESTION]}, "messages.0"),
        ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "1"}]}, "messages.0"),
        ({"functions": [LIGHTS["function"]]}, "functions"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(server, body, param):
    response = httpx.post(f"{server}/v1/chat/completions", json={"messages": QUESTION, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


QWEN = Path.home() / ".cache/mmllm/weights/qwen2.5-0.5b-instruct"


@pytest.mark.slow
@pytest.mark.skipif(not QWEN.is_dir(), reason="needs Qwen2.5-0.5B-Instruct's weights")
def test_qwen_calls_tools_in_its_own_format_and_answers_in_json():
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    weather = [{"role": "user", "content": "What is the weather like in Paris, in celsius?"}]
    with serving("qwen2.5-0.5b-instruct") as url:
        openai = client(url)
        for stream in (False, True):
            content, calls, finish = ask(url, stream, weather, tools=[WEATHER])
            assert finish == "tool_calls" and calls, (content, calls)
            assert calls[0]["function"]["name"] == "get_weather"
            assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
        parsed = openai.chat.completions.parse(
            model="mmllm",
            messages=[{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}],
            response_format=City,
            max_tokens=64,
        )
        assert parsed.choices[0].message.parsed == City(name="Paris", country="France")
