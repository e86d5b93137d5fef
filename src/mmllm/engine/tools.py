"""Tool calling in the chat template's own format: rendering OpenAI's `tools`, tool calls and tool
results into a prompt, the grammar that makes an answer a tool call, and splitting an answer (whole or
as it streams) into its text and its tool calls.

The format is the Hermes one Qwen2.5's template uses: the tools' JSON schemas in the system prompt,
each call `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, each result a user turn
`<tool_response>\\n...\\n</tool_response>`. A template that renders `tools` itself is given them (and
the calls and results, as transformers' tool-use convention has them); for one that does not, the
same text is written into plain system, user and assistant messages.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llguidance import LLTokenizer

    from mmllm.processor import MultimodalProcessor

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# Qwen2.5's own words (its chat template's tool section), used where a template has none.
HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
# How a call's JSON begins when its name comes first (what the format asks for): enough to stream
# the name, then its arguments as they grow.
HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
# JSON in answers: no free whitespace (a small model pads with blanks until its limit otherwise), the
# separators models are trained on.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def has_tool_messages(conversation: list[dict[str, Any]]) -> bool:
    return any(message["role"] == "tool" or message.get("tool_calls") for message in conversation)


@functools.lru_cache(maxsize=8)
def template_renders_tools(processor: MultimodalProcessor) -> bool:
    """Whether the processor's chat template writes `tools` into the prompt itself."""
    probe = {"type": "function", "function": {"name": "mmllm_probe_tool", "parameters": {"type": "object"}}}
    try:
        text = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}],
            tools=[probe],
            tokenize=False,
            add_generation_prompt=True,
            chat_template=processor.chat_template,
        )
    except Exception:  # a template that fails on tools has none
        return False
    return "mmllm_probe_tool" in text


def call_text(call: dict[str, Any]) -> str:
    """One tool call as the format writes it."""
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def hermes_messages(conversation: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation as plain messages holding the tool format's text (for templates without it)."""
    messages: list[dict[str, str]] = []
    if tools:
        listing = HERMES_TOOLS.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if conversation[0]["role"] == "system":
            listing = conversation[0]["content"] + "\n\n" + listing
            conversation = conversation[1:]
        messages.append({"role": "system", "content": listing})
    for message in conversation:
        if message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if messages and messages[-1].get("tool_results"):  # results in a row share one user turn
                messages[-1]["content"] += "\n" + response
            else:
                messages.append({"role": "user", "content": response, "tool_results": "yes"})
        elif message.get("tool_calls"):
            calls = "\n".join(call_text(call) for call in message["tool_calls"])
            text = message.get("content") or ""
            messages.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        else:
            messages.append({"role": message["role"], "content": message["content"]})
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_with_tools(
    processor: MultimodalProcessor,
    conversation: list[dict[str, Any]],
    num_images: int,
    image_words: list[str] | None,
    tools: list[dict[str, Any]],
) -> dict[str, Any]:
    """`processor.encode_text` for a conversation with tools, tool calls or tool results."""
    if not template_renders_tools(processor):
        return processor.encode_text(
            hermes_messages(conversation, tools), num_images, image_words=image_words
        )
    messages = [{**message, "content": message.get("content") or ""} for message in conversation]
    messages = processor._place_images(messages, num_images, image_words)
    text = processor.tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        tokenize=False,
        add_generation_prompt=True,
        chat_template=processor.chat_template,
    )
    return {"input_ids": processor.tokenizer(text, add_special_tokens=False)["input_ids"]}


def lark_literal(text: str, processor: MultimodalProcessor, tokenizer: LLTokenizer) -> str:
    """`text` in a Lark grammar: the special token it names where the vocabulary has one (a model
    writes `<tool_call>` as that one token, never spelt out), else a string."""
    token = processor.tokenizer.convert_tokens_to_ids(text)
    special = isinstance(token, int) and token < tokenizer.vocab_size and tokenizer.is_special_token(token)
    if special and processor.tokenizer.convert_ids_to_tokens(token) == text:
        return text
    return json.dumps(text)


def tool_call_grammar(
    tools: list[dict[str, Any]],
    parallel: bool,
    processor: MultimodalProcessor,
    tokenizer: LLTokenizer,
) -> str:
    """An llguidance grammar for an answer that is one tool call (or, `parallel`, one or more) of
    `tools`, each call's arguments valid against its function's parameters."""
    from llguidance import LLMatcher

    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": tool["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = {"x-guidance": JSON_OPTIONS, **(calls[0] if len(calls) == 1 else {"anyOf": calls})}
    opening, closing = (lark_literal(tag, processor, tokenizer) for tag in (OPEN, CLOSE))
    repeat = ' ("\\n" call)*' if parallel else ""
    lark = f'start: call{repeat}\ncall: {opening} "\\n" %json {json.dumps(schema)} "\\n" {closing}\n'
    return LLMatcher.grammar_from_lark(lark)


def json_grammar(schema: dict[str, Any]) -> str:
    """An llguidance grammar for JSON valid against `schema`, without free whitespace."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


class ToolCallParser:
    """Splits an answer into its text and its tool calls, piece by piece as it streams, into OpenAI's
    deltas: `{"content": ...}`, a call's `{"tool_calls": [{index, id, type, function: {name,
    arguments: ""}}]}` once its name is known, then its arguments as they grow. A whole answer is the
    same pieces merged (`parse`), so streamed and not streamed agree.

    Text outside the calls is the content, without its leading and trailing whitespace (the newlines
    around calls): whitespace goes out only once text follows it. A `<tool_call>` whose JSON names no
    function is text. An answer that begins with a bare JSON call, without the tags (as small models
    write them: Qwen2.5-0.5B does), is a call too: an answer that begins with `{` is held until its
    JSON is whole, then is a call or text.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.in_call = False
        self.bare = False  # the call in progress has no tags
        self.started = False  # content other than whitespace went out
        self.held = ""  # whitespace waiting for text after it
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buffer += text
        deltas: list[dict[str, Any]] = []
        while True:
            if not self.in_call and not self.started and not self.calls and self.buffer.lstrip()[:1] == "{":
                self.buffer, self.in_call, self.bare = self.buffer.lstrip(), True, True
                self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "start": -1, "sent": 0})
            if self.in_call and self.bare:
                try:
                    _, end = json.JSONDecoder().raw_decode(self.buffer)
                except json.JSONDecodeError:
                    return deltas + self._progress(self.buffer)
                deltas += self._close(self.buffer[:end])
                self.buffer, self.in_call, self.bare = self.buffer[end:], False, False
            elif not self.in_call:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, OPEN)
                    deltas += self._content(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return deltas
                deltas += self._content(self.buffer[:at])
                self.buffer, self.in_call = self.buffer[at + len(OPEN) :], True
                self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "start": -1, "sent": 0})
            else:
                at = self.buffer.find(CLOSE)
                if at < 0:
                    body = self.buffer[: len(self.buffer) - _partial_suffix(self.buffer, CLOSE)]
                    return deltas + self._progress(body)
                deltas += self._close(self.buffer[:at])
                self.buffer, self.in_call = self.buffer[at + len(CLOSE) :], False

    def finish(self) -> list[dict[str, Any]]:
        """The answer ended: a call cut short ends with what it has, held text goes out."""
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            deltas = self._close(rest)
            self.in_call = self.bare = False
            return deltas
        return self._content(rest)

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not self.started:
            text = text.lstrip()
            if not text:
                return []
            self.started = True
        text = self.held + text
        kept = text.rstrip()
        self.held = text[len(kept) :]
        return [{"content": kept}] if kept else []

    def _progress(self, body: str) -> list[dict[str, Any]]:
        """A call's name once it is known, then its arguments so far (less what may close the call)."""
        index, call = len(self.calls) - 1, self.calls[-1]
        deltas = []
        if call["start"] < 0:
            header = HEADER.match(body)
            if header is None:
                return []
            call["start"] = header.end()
            name = json.loads(f'"{header.group(1)}"')
            function = {"name": name, "arguments": ""}
            deltas.append(
                {"tool_calls": [{"index": index, "id": call["id"], "type": "function", "function": function}]}
            )
        arguments = body[call["start"] :].rstrip("} \n\t\r")
        return deltas + self._arguments(index, arguments)

    def _arguments(self, index: int, arguments: str) -> list[dict[str, Any]]:
        call = self.calls[index]
        if len(arguments) <= call["sent"]:
            return []
        delta = arguments[call["sent"] :]
        call["sent"] = len(arguments)
        return [{"tool_calls": [{"index": index, "function": {"arguments": delta}}]}]

    def _close(self, body: str) -> list[dict[str, Any]]:
        index, call = len(self.calls) - 1, self.calls[-1]
        deltas = self._progress(body)
        try:
            whole = json.loads(body)
        except json.JSONDecodeError:
            whole = None
        if call["start"] >= 0:  # named already: its arguments are the JSON value after "arguments"
            try:
                _, end = json.JSONDecoder().raw_decode(body, call["start"])
            except json.JSONDecodeError:
                end = len(body)  # cut short or malformed: all of it
            return deltas + self._arguments(index, body[call["start"] : end])
        if isinstance(whole, dict) and isinstance(whole.get("name"), str):
            arguments = json.dumps(whole.get("arguments", {}), ensure_ascii=False)
            function = {"name": whole["name"], "arguments": arguments}
            return [
                {"tool_calls": [{"index": index, "id": call["id"], "type": "function", "function": function}]}
            ]
        self.calls.pop()  # not a call after all: its text is content
        if self.bare:
            return self._content(body)
        return self._content(f"{OPEN}{body}{CLOSE}" if body else OPEN)


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer's content (None without any) and its tool calls, in OpenAI's message shape."""
    parser = ToolCallParser()
    return merge([*parser.feed(text), *parser.finish()])


def merge(deltas: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """Deltas joined: the content (None without any) and the tool calls."""
    content = "".join(delta["content"] for delta in deltas if "content" in delta)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for part in delta.get("tool_calls", ()):
            call = calls.setdefault(part["index"], {"function": {"arguments": ""}})
            if "id" in part:
                call.update(id=part["id"], type="function")
                call["function"]["name"] = part["function"]["name"]
            call["function"]["arguments"] += part["function"]["arguments"]
    return content or None, [calls[index] for index in sorted(calls)]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that `tag` begins with (and is not all of it)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
