"""Request and response models: what the OpenAPI schema shows is what the server accepts and returns."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

# OpenAI's seed is a 64-bit integer; larger ones overflowed torch's generator (a 500) before.
SEED = Field(default=None, ge=-(2**63), le=2**63 - 1, description="random seed for sampling (int64)")


def _valid_unicode(text: str) -> str:
    # JSON can carry lone UTF-16 surrogates ("\ud800"), which no tokenizer (or UTF-8 encoder) accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds a lone UTF-16 surrogate, which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


# Unknown fields are refused, at every level (see `ChatCompletionRequest`).
CLOSED = ConfigDict(extra="forbid")
# A hint for OpenAI's prompt cache (this server keeps its own): accepted, without effect.
CACHE_BREAKPOINT = Field(default=None, description="OpenAI's prompt-cache hint: accepted, without effect")


class ImageURL(BaseModel):
    model_config = CLOSED

    url: str = Field(description="data:image/...;base64,... (remote http(s) only when the server allows it)")
    detail: Literal["auto", "low", "high", "original"] | None = Field(
        default=None, description="accepted, without effect: every image is read at the model's resolution"
    )


class TextPart(BaseModel):
    model_config = CLOSED

    type: Literal["text"]
    text: Text
    prompt_cache_breakpoint: dict[str, Any] | None = CACHE_BREAKPOINT


class ImagePart(BaseModel):
    model_config = CLOSED

    type: Literal["image_url"]
    image_url: ImageURL | str
    prompt_cache_breakpoint: dict[str, Any] | None = CACHE_BREAKPOINT


class InputAudio(BaseModel):
    model_config = CLOSED

    data: str = Field(description="base64-encoded audio")
    format: str = Field(default="wav", description="accepted, without effect: the audio's own header says")


class AudioPart(BaseModel):
    model_config = CLOSED

    type: Literal["input_audio"]
    input_audio: InputAudio
    prompt_cache_breakpoint: dict[str, Any] | None = CACHE_BREAKPOINT


# Tagged by `type`, so a bad part is reported against its own fields, not against every kind of part.
ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class CalledFunction(BaseModel):
    model_config = CLOSED

    name: str = Field(min_length=1)
    arguments: Text = Field(description="the arguments, a JSON object as a string")


class ToolCallParam(BaseModel):
    """A tool call an earlier assistant message made (as a response's `tool_calls` holds it)."""

    model_config = CLOSED

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = CLOSED

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="`developer` is OpenAI's newer name for `system`, and is read as one; `tool`: a tool's "
        "result, answering the assistant's call `tool_call_id`"
    )
    content: Text | list[ContentPart] | None = Field(
        default=None, description="null (or left out) only in an assistant message with `tool_calls`"
    )
    name: str | None = Field(default=None, description="accepted, without effect: no template shows names")
    tool_calls: list[ToolCallParam] | None = Field(
        default=None, description="an assistant message's tool calls, as the response gave them"
    )
    tool_call_id: str | None = Field(default=None, description="a `tool` message's call")

    @field_validator("content", mode="before")
    @classmethod
    def _string_or_parts(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not isinstance(part, dict) or "type" not in part:
                    raise ValueError(f"part {i} needs a `type` (text, image_url or input_audio)")
        elif not isinstance(value, str) and (value is not None or info.data.get("role") != "assistant"):
            got = "null" if value is None else type(value).__name__
            raise ValueError(f"content is {got}; give a string or a list of content parts")
        return value

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> ChatMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("content is null; give a string, a list of content parts, or tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role} ones")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise ValueError("a tool message needs the tool_call_id it answers (and only a tool message)")
        return self


_NON_BLANK = {"type": "string", "pattern": "\\S"}
# What `app._has_content` checks, said in the schema: at least one user message with text that is not
# blank, or with an image or audio part.
USER_MESSAGE_WITH_CONTENT = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "user"},
        "content": {
            "anyOf": [
                _NON_BLANK,
                {
                    "type": "array",
                    "contains": {
                        "anyOf": [
                            {
                                "required": ["type"],
                                "properties": {"type": {"enum": ["image_url", "input_audio"]}},
                            },
                            {
                                "required": ["type", "text"],
                                "properties": {"type": {"const": "text"}, "text": _NON_BLANK},
                            },
                        ]
                    },
                },
            ]
        },
    },
}


# Strict: what the schema says is what passes (`"n": 1.0` or `"ignore_eos": 0` are refused, not coerced),
# and a field the server does not know is a 400 naming it, not silently dropped: a client that asks
# for something gets it or hears why not (docs/api.md, "Request fields").
STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = Field(default=False, description="end the stream with a chunk holding the usage")
    include_obfuscation: bool | None = Field(
        default=None, description="accepted, without effect: chunks carry no obfuscation padding"
    )


# The OpenAI fields this server accepts and that change nothing in the answer: bookkeeping for OpenAI's
# own platform (storage, billing tiers, caching, abuse detection).
METADATA_FIELDS = (
    "metadata",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "safety_identifier",
    "service_tier",
    "store",
    "user",
)
NO_EFFECT = "OpenAI metadata: accepted, without effect on the answer"
NOT_YET = "not supported yet: only its no-op value passes, anything else is a 400 naming it"


class TextFormat(BaseModel):
    model_config = STRICT

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT

    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="a JSON schema; null or left out: any JSON object"
    )
    strict: bool | None = Field(
        default=None, description="accepted: the answer always follows the schema (constrained decoding)"
    )


class JsonSchemaFormat(BaseModel):
    model_config = STRICT

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class FunctionDefinition(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="a JSON schema for the arguments; null or left out: any object"
    )
    strict: bool | None = Field(
        default=None, description="accepted: forced calls (`required`, a named function) always validate"
    )


class ToolParam(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


def _unsupported(description: str) -> Any:
    return Field(default=None, description=f"{NOT_YET} ({description})")


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completions request, every field of it (as of `openai` 3.63's
    `CompletionCreateParams`), plus vLLM's extensions `top_k`, `repetition_penalty`, `ignore_eos`,
    `min_p`, `min_tokens`, `stop_token_ids`.

    Each field is honoured, accepted without effect (`METADATA_FIELDS`), or not supported yet: those
    pass only with their no-op value (`n: 1`, `functions: []`, ...) and otherwise get a 400 naming
    them (`unsupported`); fields that contradict each other are a 400 too (`invalid`). A field
    outside all of these is a 400 too.
    """

    model_config = STRICT

    model: Text = Field(default="mmllm", description="a name from GET /v1/models")
    messages: list[ChatMessage] = Field(
        min_length=1, json_schema_extra={"contains": USER_MESSAGE_WITH_CONTENT}
    )
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=0.0, ge=0.0, le=2.0, description="null: 0 (greedy)")
    top_p: float | None = Field(
        default=1.0, ge=0.0, le=1.0, description="null: 1; 0 (as OpenAI takes it): the likeliest token alone"
    )
    stop: Text | list[Text] | None = Field(default=None, description="empty strings stop nothing")
    seed: int | None = SEED
    n: int | None = Field(default=1, ge=1, description="choices per request: only 1 so far")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    top_k: int = Field(
        default=0, ge=0, description="mmllm/vLLM extension: sample from the k likeliest (0: all)"
    )
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=100.0, description="mmllm/vLLM extension: penalise repeated tokens (1: off)"
    )
    ignore_eos: bool = Field(default=False, description="mmllm/vLLM extension: always generate max_tokens")
    cache_salt: Text | None = Field(
        default=None,
        description="vLLM extension: the prefix cache shares KV only between requests with the same salt "
        "(and API key)",
    )

    # Accepted, without effect on the answer.
    metadata: dict[str, str] | None = Field(default=None, description=NO_EFFECT)
    prompt_cache_key: str | None = Field(default=None, description=NO_EFFECT)
    prompt_cache_options: dict[str, Any] | None = Field(default=None, description=NO_EFFECT)
    prompt_cache_retention: str | None = Field(default=None, description=NO_EFFECT)
    safety_identifier: str | None = Field(default=None, description=NO_EFFECT)
    service_tier: str | None = Field(default=None, description=NO_EFFECT)
    store: bool | None = Field(default=None, description=NO_EFFECT)
    user: str | None = Field(default=None, description=NO_EFFECT)

    # Structured outputs, tools, log-probabilities and logit controls (torch and llama.cpp backends).
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object / json_schema: the answer is JSON (valid against the schema)"
    )
    tools: list[ToolParam] | None = Field(default=None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="with tools: auto (the default), none, required, or one named function"
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="true (the default): a forced answer may hold several calls"
    )
    logprobs: bool | None = Field(default=None, description="each answer token's log-probability")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="with logprobs: this many likeliest tokens per position"
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string) -> a bias in [-100, 100] added to its logit"
    )
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    min_p: float | None = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="vLLM extension: keep tokens this fraction as likely as the top (null: 0)",
    )
    min_tokens: int | None = Field(
        default=0, ge=0, description="vLLM extension: no stop token before this many (null: 0)"
    )
    stop_token_ids: list[int] | None = Field(
        default=None, description="vLLM extension: token ids that end the answer too"
    )

    # Not supported yet: their no-op values pass.
    functions: list[dict[str, Any]] | None = _unsupported("[] passes; `tools` is their successor")
    function_call: Literal["none", "auto"] | dict[str, Any] | None = _unsupported(
        '"none" passes, and "auto" without functions'
    )
    modalities: list[Literal["text", "audio"]] | None = _unsupported('["text"] passes')
    audio: dict[str, Any] | None = _unsupported("audio output; null passes")
    prediction: dict[str, Any] | None = _unsupported("predicted outputs; null passes")
    reasoning_effort: ReasoningEffort | None = _unsupported('"none" passes: the model does not reason')
    verbosity: Literal["low", "medium", "high"] | None = _unsupported("null passes")
    web_search_options: dict[str, Any] | None = _unsupported("null passes")
    moderation: dict[str, Any] | None = _unsupported("null passes")

    def unsupported(self) -> tuple[str, str] | None:
        """The first field asking for behaviour this server does not implement yet, and why, as
        (field, message); None when every field is honoured or holds its no-op value."""
        calling = "the legacy function calling; `tools` and `tool_choice` work"
        checks = (
            ("functions", bool(self.functions), calling),
            (
                "function_call",
                self.function_call not in (None, "none")
                and not (self.function_call == "auto" and not self.functions),
                calling,
            ),
            ("n", (self.n or 1) > 1, f"n = {self.n}: one choice per request; send n requests (with seeds)"),
            ("modalities", self.modalities not in (None, ["text"]), f"{self.modalities}; ['text'] passes"),
            ("audio", self.audio is not None, "audio output"),
            ("prediction", self.prediction is not None, "predicted outputs"),
            ("reasoning_effort", self.reasoning_effort not in (None, "none"), "the model does not reason"),
            ("verbosity", self.verbosity is not None, "null passes"),
            ("web_search_options", self.web_search_options is not None, "web search"),
            ("moderation", self.moderation is not None, "null passes"),
        )
        for field, asked, detail in checks:
            if asked:
                return field, f"`{field}` is not supported yet ({detail})"
        return None

    @property
    def forced_call(self) -> bool:
        """Whether `tool_choice` makes the answer a tool call (`required`, or a named function)."""
        choice = self.tool_choice
        return bool(self.tools) and (choice == "required" or isinstance(choice, NamedToolChoice))

    @property
    def constrained(self) -> bool:
        """Whether the answer decodes through a grammar (a forced tool call, or JSON)."""
        return self.forced_call or (self.response_format is not None and self.response_format.type != "text")

    def invalid(self) -> tuple[str, str] | None:
        """The first field that contradicts another (as (field, message)), as OpenAI refuses them."""
        names = [tool.function.name for tool in self.tools or ()]
        choice, forced, constrained = self.tool_choice, self.forced_call, self.constrained
        checks = (
            ("top_logprobs", bool(self.top_logprobs) and not self.logprobs, "needs logprobs: true"),
            ("tools", len(set(names)) < len(names), "two tools have one name"),
            (
                "tool_choice",
                choice not in (None, "none", "auto") and not self.tools,
                "is only allowed when tools are given",
            ),
            (
                "tool_choice",
                isinstance(choice, NamedToolChoice) and choice.function.name not in names,
                f"names {getattr(getattr(choice, 'function', None), 'name', '')!r}, which is not in tools",
            ),
            (
                "response_format",
                forced and self.response_format is not None and self.response_format.type != "text",
                "cannot shape an answer that tool_choice forces to be a tool call",
            ),
            ("ignore_eos", self.ignore_eos and constrained, "cannot go past the end of a constrained answer"),
        )
        for field, bad, detail in checks:
            if bad:
                return field, f"{field} {detail}"
        return None

    def logit_bias_ids(self) -> dict[int, float] | None:
        """`logit_bias` with its keys as token ids; ValueError names a key that is not one."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys are token ids; {key!r} is not one")
            bias[int(key)] = value
        return bias

    def stop_strings(self) -> list[str]:
        """The stop strings, one list; an empty string stops nothing, so it is left out."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]

    @property
    def limit_field(self) -> str:
        """Which of OpenAI's names carries the token limit: the newer `max_completion_tokens` when given,
        else the older `max_tokens` (what errors about the limit name)."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def generation_options(self, default_max_new_tokens: int) -> dict[str, Any]:
        """The request's `GenerationSettings`: OpenAI's token limit (`limit_field`, or, naming neither,
        `default_max_new_tokens`) becomes `max_new_tokens` here, and only here; a null temperature or
        top_p is OpenAI's default."""
        return {
            "max_new_tokens": getattr(self, self.limit_field) or default_max_new_tokens,
            "temperature": 0.0 if self.temperature is None else self.temperature,
            # 0 keeps the likeliest token alone, as the smallest positive top_p does (lmms-eval's tasks
            # send 0 with greedy decoding, where it changes nothing).
            "top_p": 1.0 if self.top_p is None else self.top_p or math.ulp(0.0),
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "min_p": self.min_p or 0.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": self.logit_bias_ids(),
            "min_tokens": self.min_tokens or 0,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
        }


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text, as generated")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens read from the prefix cache, not computed again")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a `prompt` as it is, or `messages` through the chat template (images
    become their placeholder tokens)."""

    model_config = STRICT

    model: Text = Field(default="mmllm", description="a name from GET /v1/models")
    prompt: Text | None = Field(default=None, description="text to tokenize as it is")
    messages: list[ChatMessage] | None = Field(default=None, description="a conversation, as in chat")
    tools: list[ToolParam] | None = Field(default=None, description="with messages: tools in the prompt")
    add_special_tokens: bool = Field(default=True, description="with prompt: the tokenizer's BOS and such")
    return_token_strs: bool = Field(default=False, description="also each token's text")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = STRICT

    model: Text = Field(default="mmllm", description="a name from GET /v1/models")
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class GenerateRequest(BaseModel):
    model_config = STRICT

    prompt: Text = Field(min_length=1, description="the question or instruction")
    image: str | None = Field(default=None, description="base64 image bytes or a data URI")
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    num_beams: int = Field(default=1, ge=1, le=8)
    seed: int | None = SEED

    def generation_options(self) -> dict[str, Any]:
        """The request's `GenerationSettings` (its `max_tokens` is their `max_new_tokens`)."""
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "num_beams": self.num_beams,
            "seed": self.seed,
        }


class CaptionRequest(BaseModel):
    model_config = STRICT

    image: str = Field(min_length=1, description="base64 image bytes or a data URI")
    max_tokens: int = Field(default=48, ge=1)

    def generation_options(self) -> dict[str, Any]:
        """The request's `GenerationSettings` (its `max_tokens` is their `max_new_tokens`)."""
        return {"max_new_tokens": self.max_tokens}


class TextResponse(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    version: str
    """The mmllm version serving."""
    vision_trained: bool
    queue_depth: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
