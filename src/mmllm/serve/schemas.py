"""Request and response models: what the OpenAPI schema shows is what the server accepts and returns."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

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


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... (remote http(s) only when the server allows it)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


class InputAudio(BaseModel):
    data: str = Field(description="base64-encoded audio")
    format: str = "wav"


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


# Tagged by `type`, so a bad part is reported against its own fields, not against every kind of part.
ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _string_or_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not isinstance(part, dict) or "type" not in part:
                    raise ValueError(f"part {i} needs a `type` (text, image_url or input_audio)")
        elif not isinstance(value, str):
            got = "null" if value is None else type(value).__name__
            raise ValueError(f"content is {got}; give a string or a list of content parts")
        return value


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


# Strict: what the schema says is what passes (`"n": 1.0` or `"ignore_eos": 0` are refused, not coerced);
# unknown fields are ignored, as OpenAI clients send many.
STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = Field(default=False, description="end the stream with a chunk holding the usage")


class ChatCompletionRequest(BaseModel):
    model_config = STRICT

    model: Text = Field(default="mmllm", description="a name from GET /v1/models")
    messages: list[ChatMessage] = Field(
        min_length=1, json_schema_extra={"contains": USER_MESSAGE_WITH_CONTENT}
    )
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = SEED
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = Field(
        default=0, ge=0, description="mmllm/vLLM extension: sample from the k likeliest (0: all)"
    )
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=100.0, description="mmllm/vLLM extension: penalise repeated tokens (1: off)"
    )
    ignore_eos: bool = Field(default=False, description="mmllm/vLLM extension: always generate max_tokens")

    def generation_options(self, default_max_new_tokens: int) -> dict[str, Any]:
        """The request's `GenerationSettings`: OpenAI's token limit (the newer `max_completion_tokens`,
        the older `max_tokens`, or, naming neither, `default_max_new_tokens`) becomes `max_new_tokens`
        here, and only here."""
        return {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens or default_max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
