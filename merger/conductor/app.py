"""The conductor's HTTP app: an OpenAI-compatible server (FastAPI) over `routing` and `workflow`, with an
optional API key, the client bounds of `serving`, and errors in OpenAI's shape. A stream falls back only
until a member's first piece: after it, a fallback would splice two answers together, so a member that
breaks its stream is reported in the stream instead."""

from __future__ import annotations

import hmac
import os
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from merger.common.errors import MergerError, shown
from merger.conductor.api import (
    AUTH_RESPONSES,
    COMPLETION_RESPONSES,
    ChatCompletionRequest,
    error_response,
    validation_message,
)
from merger.conductor.backends import Generation, MemberFailure, Messages
from merger.conductor.routing import Conductor, NoMemberAnswered, Refused, Route
from merger.conductor.serving import RequestLimits
from merger.conductor.upstream import PastTokenCap, close_quietly
from merger.conductor.wire import (
    DONE_EVENT,
    MEMBERS_HEADER,
    chunk_event,
    completion_body,
    error_event,
    merger_field,
    replay_as_stream,
    request_messages,
    requested_generation,
    requested_plan_execute_verify,
    routed_query,
)
from merger.conductor.workflow import answer, runs_plan_execute_verify
from merger.router.pool import ServerSettings

_BEARER = HTTPBearer(auto_error=False)  # module level: FastAPI resolves the string annotations here


def expected_api_key(server: ServerSettings) -> str:
    """The key clients must send ('' for none). A named variable that is unset is refused, not ignored:
    serving without a key takes `auth: none`."""
    if server.auth == "none" or not server.api_key_env:
        return ""
    key = os.environ.get(server.api_key_env, "")
    if not key:
        raise MergerError(
            f"server.api_key_env names {shown(server.api_key_env)}, which is not set: set it, or say "
            "`auth: none` in the pool's server settings to serve without a key"
        )
    return key


def create_app(conductor: Conductor) -> FastAPI:
    pool = conductor.pool
    settings = pool.server
    app = FastAPI(
        title="merger conductor", version="1", description="OpenAI-compatible router over a model pool"
    )
    app.add_middleware(
        RequestLimits, max_body_bytes=settings.max_body_bytes, read_timeout_s=settings.read_timeout_s
    )
    expected_key = expected_api_key(settings)

    async def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if not expected_key:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), expected_key.encode()):
            raise StarletteHTTPException(
                status_code=401, detail="missing or invalid API key (Authorization: Bearer)"
            )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "authentication_error" if error.status_code == 401 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "members": conductor.breaker.state()}

    @app.get("/v1/models", dependencies=[Depends(require_key)], responses=AUTH_RESPONSES)
    async def models() -> dict[str, Any]:
        ids = [settings.model_name, *pool.names]
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": "merger"} for i in ids],
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)], responses=COMPLETION_RESPONSES)
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        return await _chat_completion(conductor, request)

    return app


async def _chat_completion(conductor: Conductor, request: ChatCompletionRequest) -> Any:
    settings = conductor.pool.server
    if request.model not in (settings.model_name, *conductor.pool.names):
        return error_response(
            404,
            f"unknown model {shown(request.model)}; use {settings.model_name!r} or a member name",
            "not_found_error",
        )
    if request.prompt_chars() > settings.max_prompt_chars:
        return error_response(
            413,
            f"prompt of {request.prompt_chars():,} characters, over the server's {settings.max_prompt_chars:,}",
            "request_too_large",
        )
    messages = request_messages(request)
    pinned = None if request.model == settings.model_name else request.model
    route = await conductor.route(routed_query(messages), pinned=pinned)
    generation = requested_generation(request, settings)
    pev = requested_plan_execute_verify(request, settings)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        if request.stream and not runs_plan_execute_verify(route, pev):
            return await _stream_response(conductor, route, messages, generation, completion_id)
        answered = await answer(conductor, route, messages, generation, pev)
    except NoMemberAnswered as failure:
        return _no_member(failure)
    except Refused as refused:
        return _refused(conductor, refused)
    body = completion_body(completion_id, settings.model_name, answered, route)
    headers = {MEMBERS_HEADER: ",".join(answered.members)}
    if request.stream:  # plan–execute–verify runs to the end, then streams the final answer as one chunk
        return StreamingResponse(replay_as_stream(body), media_type="text/event-stream", headers=headers)
    return JSONResponse(body, headers=headers)


def _no_member(failure: NoMemberAnswered) -> JSONResponse:
    tried = "; ".join(f"{attempt['member']} {attempt['outcome']}" for attempt in failure.attempts)
    return error_response(503, f"no pool member could answer: {tried or 'no members'}", "service_unavailable")


def _refused(conductor: Conductor, refused: Refused) -> JSONResponse:
    rejection = refused.rejection
    message = conductor.redact(f"member {refused.member} refused the request: {rejection}")
    response = error_response(rejection.status, message, "invalid_request_error", rejection.code)
    response.headers[MEMBERS_HEADER] = refused.member
    return response


async def _stream_response(
    conductor: Conductor,
    route: Route,
    messages: Messages,
    generation: Generation,
    completion_id: str,
) -> StreamingResponse:
    member, first, pieces, attempts = await conductor.open_stream(route.ranking, messages, generation)
    model = conductor.pool.server.model_name
    extra = {"merger": merger_field([member], attempts, "single", route)}

    async def events() -> AsyncIterator[str]:
        try:
            yield chunk_event(completion_id, model, {"role": "assistant", "content": first}, None, extra)
            async for piece in pieces:
                yield chunk_event(completion_id, model, {"content": piece}, None)
        except PastTokenCap as error:  # max_tokens pieces were relayed: the answer ends there
            conductor.record_failure(member, error, attempts)
            yield chunk_event(completion_id, model, {}, "length", extra)
            yield DONE_EVENT
            return
        except MemberFailure as error:
            conductor.record_failure(member, error, attempts)
            yield error_event(f"member {member} broke its stream: {conductor.redact(str(error))}")
            return
        finally:
            await close_quietly(pieces)  # also when the client went away mid-stream
        conductor.breaker.record_success(member)
        yield chunk_event(completion_id, model, {}, "stop", extra)
        yield DONE_EVENT

    return StreamingResponse(events(), media_type="text/event-stream", headers={MEMBERS_HEADER: member})
