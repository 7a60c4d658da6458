"""OpenAI API request and response bodies (the subset Shoal serves).

No parameter is accepted and then ignored: a request that sets one Shoal does
not implement (tools, best_of, ...) or one it does
not know gets a 400 naming it, as OpenAI's own API refuses unrecognised
arguments. A parameter sent at its default value, which changes nothing, is
accepted. Names follow OpenAI's API reference.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20
MAX_SCHEMA_CHARS = 65_536
MAX_CHOICES = 16
MAX_PROMPT_CHARS = 2_000_000


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


# OpenAI parameters Shoal does not implement, with the values that ask for nothing (clients and SDKs send
# some of them by default): any other value, and any parameter missing here and from the request models,
# is refused.
NO_EFFECT: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # about tools, of which there are none
    "best_of": (None, 1),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "store": (None, False),
}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _bounded(self) -> JsonSchemaFormat:
        if len(self.text()) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the JSON schema is longer than {MAX_SCHEMA_CHARS} characters")
        return self

    def text(self) -> str:
        return json.dumps(self.schema_ or {})


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is given with type "json_schema", and only then')
        return self

    def grammar(self) -> str:
        """The JSON schema the output must match, as JSON text ("": free text)."""
        if self.type == "text":
            return ""
        if self.json_schema is None:  # json_object: any JSON object
            return '{"type": "object"}'
        return self.json_schema.text()


class _SamplingFields(BaseModel):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[Annotated[str, Field(max_length=256)]] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=2, description="Extension (as in vLLM and transformers): 1 is off."
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Token id (as a string) -> bias added to its logit."
    )
    min_tokens: int | None = Field(
        default=None, ge=0, le=1_000_000, description="Extension (as in vLLM): no end before this many tokens."
    )
    response_format: ResponseFormat | None = None
    user: str | None = Field(default=None, max_length=256)
    ignore_eos: bool = Field(default=False, description="Extension (as in vLLM): keep generating past end-of-sequence.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        bad = next((key for key in value if not (key.isascii() and key.isdigit() and int(key) < 2**31)), None)
        if bad is not None:
            raise ValueError(f"keys must be token ids, got {bad[:32]!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refused = [
                name
                for name, value in data.items()
                if name not in cls.model_fields and value not in NO_EFFECT.get(name, ())
            ]
            if refused:
                raise ValueError(
                    f"{', '.join(sorted(refused))} {'is' if len(refused) == 1 else 'are'} not supported by this "
                    "server (refused rather than ignored)"
                )
        return data


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def wanted_logprobs(self) -> int | None:
        """Alternatives per token to report, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: str | list[Annotated[int, Field(ge=0, lt=2**31)]] | list[str] = Field(
        description="A string, a list of token ids, or a list holding one string."
    )
    max_tokens: int | None = Field(default=16, ge=1, le=1_000_000)
    echo: bool = Field(default=False, description="Only false is served.")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("only one prompt per request is served")
            return str(value[0])
        if isinstance(value, str) and len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        if isinstance(value, list) and not value:
            raise ValueError("prompt is empty")
        return value  # type: ignore[return-value]

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server")
        return value
