"""The conductor's HTTP request and error schema: the subset of OpenAI chat completions it honours.

Types are strict (`stream: "yes"` and `plan_execute_verify: 0` are refused), text must be valid Unicode
(a lone surrogate is refused), and a field the conductor cannot honour is refused with a 400 naming it
rather than dropped: tools and functions, response_format, logprobs, n > 1, non-neutral sampling
penalties, and any field it does not know. A few fields that change nothing are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, model_validator

from merger.common.schema import StrictRequestModel, format_errors

# accepted and ignored: bookkeeping that does not change the answer
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "stream_options"})
# accepted and ignored only at their neutral value (what the answer is without them)
NEUTRAL_VALUES: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_p": (1, 1.0),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "parallel_tool_calls": (True, False),  # meaningless without tools, which are refused
}


def _valid_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (a lone surrogate such as \\ud800)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_text)]


class TextPart(StrictRequestModel):
    type: Literal["text"]
    text: Text


class ChatMessage(StrictRequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(StrictRequestModel):
    model: Annotated[Text, Field(min_length=1)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    stream: bool = False
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    plan_execute_verify: bool | None = Field(
        default=None, description="merger extension: force plan–execute–verify on (true) or off (false)"
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_cannot_be_honoured(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        kept = {}
        for key, value in data.items():
            if key in known:
                kept[key] = value
            elif not _ignorable(key, value):
                raise ValueError(f"unsupported field {str(key)[:40]!r}: {_why_unsupported(str(key))}")
        return kept

    def prompt_chars(self) -> int:
        return sum(len(message.text()) for message in self.messages)


def _ignorable(key: str, value: object) -> bool:
    """Null, bookkeeping, or a setting at the value that changes nothing."""
    if value is None or key in IGNORED_FIELDS:
        return True
    neutral = NEUTRAL_VALUES.get(key, ())
    return type(value) in (bool, int, float) and any(
        value == allowed and isinstance(value, bool) == isinstance(allowed, bool) for allowed in neutral
    )


def _why_unsupported(key: str) -> str:
    if key in NEUTRAL_VALUES:
        allowed = " or ".join(str(value).lower() for value in NEUTRAL_VALUES[key][:1])
        return f"the conductor answers one plain-text choice; only {key}={allowed} is accepted"
    return "the conductor answers plain text only (no tools, functions, response formats or logprobs)"


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", code: int | str | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "code": status if code is None else code}},
    )


def validation_message(error: RequestValidationError) -> str:
    """A 400's message: where in the body (its "body" root left out) and what, on one line."""
    errors = [{**detail, "loc": [part for part in detail.get("loc", ()) if part != "body"]} for detail in error.errors()]
    return format_errors(errors, "invalid request")


def _documented(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a chat.completion (JSON), or with `stream: true` chat.completion.chunk events",
        "content": {
            "application/json": {},
            "text/event-stream": {
                "schema": {"type": "string", "description": "data: {chat.completion.chunk} ... data: [DONE]"}
            },
        },
    },
    400: _documented("invalid request: a malformed body, an unsupported field, invalid text"),
    401: _documented("missing or invalid API key (Authorization: Bearer)"),
    404: _documented("unknown model"),
    408: _documented("the request body did not arrive in time"),
    413: _documented("the body or the prompt is larger than the server allows"),
    503: _documented("no pool member could answer"),
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {401: COMPLETION_RESPONSES[401]}
