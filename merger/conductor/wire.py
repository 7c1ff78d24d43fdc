"""The OpenAI chat-completions wire format, both ways: what a request asks for (messages, the query to
route on, the generation) and the bodies and server-sent events of an answer, each carrying a `merger`
field that says who answered, what was tried and how the request was routed."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from merger.conductor.api import ChatCompletionRequest
from merger.conductor.backends import Generation, Messages
from merger.conductor.routing import Attempts, Route
from merger.conductor.workflow import Answer
from merger.router.pool import ServerSettings

MEMBERS_HEADER = "x-merger-members"
DONE_EVENT = "data: [DONE]\n\n"


def request_messages(request: ChatCompletionRequest) -> Messages:
    return [{"role": m.role, "content": m.text()} for m in request.messages]


def routed_query(messages: Messages) -> str:
    """What the router ranks members on: the last user message (the last message if none is the user's)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def requested_generation(request: ChatCompletionRequest, settings: ServerSettings) -> Generation:
    """The request's token limit (capped by the server's), temperature and stop sequences."""
    limit = request.max_completion_tokens or request.max_tokens or settings.max_tokens
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return Generation(min(limit, settings.max_tokens), request.temperature, stop)


def requested_plan_execute_verify(request: ChatCompletionRequest, settings: ServerSettings) -> bool:
    return settings.plan_execute_verify if request.plan_execute_verify is None else request.plan_execute_verify


def merger_field(members: list[str], attempts: Attempts, mode: str, route: Route) -> dict[str, Any]:
    return {
        "members": members,
        "attempts": attempts,
        "mode": mode,
        "ranking": route.ranking,
        "roles": route.role_probabilities,
    }


def completion_body(completion_id: str, model: str, answer: Answer, route: Route) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": "stop"}
        ],
        "usage": None,
        "merger": merger_field(answer.members, answer.attempts, answer.mode, route),
    }


def chunk_event(
    completion_id: str,
    model: str,
    delta: dict[str, str],
    finish: str | None,
    extra: dict[str, Any] | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if extra:
        body.update(extra)
    return f"data: {json.dumps(body)}\n\n"


def error_event(message: str) -> str:
    """An error after the stream began: the status line is long gone, so it travels as an event."""
    return f"data: {json.dumps({'error': {'message': message, 'type': 'upstream_error'}})}\n\n"


async def replay_as_stream(body: dict[str, Any]) -> AsyncIterator[str]:
    """A finished completion as a stream: the whole answer in one chunk, then the stop chunk."""
    message = body["choices"][0]["message"]
    extra = {"merger": body["merger"]}
    yield chunk_event(body["id"], body["model"], {"role": "assistant", "content": message["content"]}, None, extra)
    yield chunk_event(body["id"], body["model"], {}, "stop", extra)
    yield DONE_EVENT
