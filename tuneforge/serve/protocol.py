"""The OpenAI API as the server speaks it: request schemas checked at the boundary, error and
response bodies.

Requests are validated strictly (no "5" for 5, no unknown fields): a parameter the server does
not implement is refused with a 400 naming it, unless it has its no-op value (``n=1``,
``presence_penalty=0``, ``logprobs=false``, ...), rather than silently ignored. Text that is not
valid Unicode (a lone UTF-16 surrogate such as ``"\ud800"``, which JSON lets through) is refused
with the field it is in, before a tokenizer fails on it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n x prompts in one request: each is a row of a batch


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        """{role, content} for the chat template; "developer" is OpenAI's new name for system."""
        text = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


# Parameters accepted only with the value that means "not used" (None is always fine).
_NO_OP = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False, 0),
    "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "logit_bias": ({},),
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "response_format": ({"type": "text"},), "suffix": ("",),
}


class _Sampled(_Strict):
    """What chat and completion requests share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: bool | int | None = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self):
        for name, allowed in _NO_OP.items():
            value = getattr(self, name, None)
            if value is not None and value not in allowed:
                raise _Problem(name, f"{name} is not supported by this server (leave it unset)",
                               "unsupported_parameter")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise _Problem("stop", f"stop: at most {MAX_STOP_STRINGS} non-empty strings")
        return self

    def sampling(self, *, default_max_tokens: int | None) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return Sampling(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            max_tokens_given=self.max_tokens is not None,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed, stop=tuple(stop), n=self.n or 1, stream=bool(self.stream),
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
        )


class _Problem(ValueError):
    """A check across fields failed; names the parameter to blame."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise _Problem("max_completion_tokens",
                               "give max_tokens or max_completion_tokens, not both")
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompts(self):
        prompts = self.prompts()
        if not 1 <= len(prompts) <= MAX_CHOICES:
            raise _Problem("prompt", f"prompt: give 1 to {MAX_CHOICES} prompts")
        if len(prompts) * (self.n or 1) > MAX_CHOICES:
            raise _Problem("n", f"n x number of prompts must be at most {MAX_CHOICES}")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


@dataclass(frozen=True)
class Sampling:
    """A request's generation settings, defaults filled in (OpenAI's: temperature 1, top_p 1)."""

    max_tokens: int | None
    max_tokens_given: bool
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool


def parse_request(schema: type[_Sampled], body: Any):
    """``schema`` validated from the JSON ``body``; APIError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _refuse_lone_surrogates(body)
    try:
        return schema.model_validate(body)
    except ValidationError as err:
        raise _as_api_error(err) from None


def _refuse_lone_surrogates(body: dict) -> None:
    """APIError 400 naming the first string of ``body`` (or object key) that holds a lone
    surrogate. Iterative: the guard bounds the body's depth, but this need not rely on it."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        param, value = stack.pop()
        if isinstance(value, str):
            _check_text(value, param, param)
        elif isinstance(value, list):
            stack.extend((f"{param}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key in value:  # a bad key cannot name itself: name the object holding it
                _check_text(key, f"{param or 'the body'}: an object key", param or None)
            stack.extend((f"{param}.{k}" if param else k, v) for k, v in reversed(value.items()))


def _check_text(text: str, where: str, param: str | None) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"{where}: holds a lone UTF-16 surrogate (\\u{ord(text[err.start]):04x} "
                       f"at character {err.start}), which is not valid Unicode text; send "
                       "characters beyond U+FFFF as UTF-8 or as a surrogate pair", param=param,
                       code="invalid_value") from None


def _as_api_error(err: ValidationError) -> APIError:
    # With unions (content: str | parts) every branch reports; the deepest error is the one
    # that says what is wrong ("messages[0].content[0].type: Input should be 'text'").
    first = max(err.errors(), key=lambda e: len(e["loc"]))
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _Problem):
        return APIError(400, cause.message, param=cause.param, code=cause.code)
    param = _param_path(first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if first["type"] == "missing":
        return APIError(400, f"{param}: required", param=param, code="missing_required_parameter")
    message = str(cause) if cause is not None else first["msg"]
    return APIError(400, f"{param}: {message}" if param else message, param=param or None,
                    code="invalid_value")


def _param_path(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (union branch tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            out += f".{part}" if out else part
    return out


# ----------------------------------------------------------------------------- response bodies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_body(rid: str, created: int, model: str, choices: list[tuple[str, str]],
              prompt_tokens: int, completion_tokens: int) -> dict:
    """A ``chat.completion``; ``choices`` are (text, finish reason) by choice index."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}
                        for i, (text, finish) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_body(rid: str, created: int, model: str, choices: list[tuple[str, str]],
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """A ``text_completion``; ``choices`` are (text, finish reason) by choice index."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                        for i, (text, finish) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, created: int, model: str, index: int, *, role: bool = False,
               text: str | None = None, finish: str | None = None) -> dict:
    """One ``chat.completion.chunk``: the role first, then text deltas, then the finish."""
    delta: dict = {"role": "assistant", "content": ""} if role else {}
    if text is not None:
        delta["content"] = text
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": finish}]}


def completion_chunk(rid: str, created: int, model: str, index: int, *, text: str = "",
                     finish: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None,
                         "finish_reason": finish}]}


def usage_chunk(body: dict, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, usage."""
    return {**body, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
