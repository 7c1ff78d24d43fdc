"""The conductor: an OpenAI-compatible HTTP server that routes each request through the head (or a static
order), falls back to the next-ranked member on member errors, and keeps a circuit breaker per member.

Around it: the request schema (`api`), the breaker (`breaker`), a member call under its deadline
(`upstream`) and what one client may send and hold (`serving`)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any

import numpy as np
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
from merger.conductor.backends import Backend, Generation, MemberFailure, Messages, RequestRejected
from merger.conductor.breaker import CircuitBreaker
from merger.conductor.serving import RequestLimits
from merger.conductor.upstream import CallLimits, PastTokenCap, close_quietly, complete_within, stream_within
from merger.router.head import RouterHead, softmax
from merger.router.pool import ROLES, Pool, Role, ServerSettings

__all__ = ["MEMBERS_HEADER", "CircuitBreaker", "Conductor", "build_conductor", "create_app"]

log = logging.getLogger("merger.conductor")
MEMBERS_HEADER = "x-merger-members"
# the encoders read at most 256 tokens; routing embeds this much of the prompt, however long it is
ROUTED_PREFIX_CHARS = 8192
_BEARER = HTTPBearer(auto_error=False)  # module level: FastAPI resolves the string annotations here


# ---- routing and fallback ----


class NoMemberAnswered(Exception):
    def __init__(self, attempts: list[dict[str, str]]) -> None:
        super().__init__("no pool member answered")
        self.attempts = attempts


class Refused(Exception):
    """A member refused the request itself; the client gets its status and message."""

    def __init__(self, member: str, rejection: RequestRejected) -> None:
        super().__init__(str(rejection))
        self.member = member
        self.rejection = rejection


@dataclass
class Route:
    ranking: list[str]
    role_probabilities: dict[str, float]

    confidence_threshold: float = 0.5

    @property
    def confident(self) -> bool:
        """The head expects one Worker call to suffice: no plan–execute–verify needed."""
        return self.role_probabilities.get(Role.WORKER.value, 0.0) >= self.confidence_threshold


@dataclass
class Answer:
    text: str
    members: list[str]
    attempts: list[dict[str, str]]
    mode: str


class Conductor:
    def __init__(
        self,
        pool: Pool,
        head: RouterHead | None,
        embed: Callable[[list[str]], np.ndarray] | None,
        backends: dict[str, Backend],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.head = head
        self.embed = embed
        self.backends = backends
        self.breaker = CircuitBreaker(pool.breaker, pool.names, clock)
        self.secrets = _configured_secrets(pool)

    async def route(self, query: str, pinned: str | None = None) -> Route:
        if self.head is None or self.embed is None:  # static order: one member, or `routing: static`
            ranking = self.pool.static_order
            role_probabilities = {Role.WORKER.value: 1.0}
        else:
            # no lock: requests embed concurrently, each a bounded prefix, in worker threads
            embedding = await asyncio.to_thread(self.embed, [query[:ROUTED_PREFIX_CHARS]])
            scores, role_logits = self.head.forward(embedding)
            ranking = [self.head.members[i] for i in np.argsort(-scores[0], kind="stable")]
            probabilities = softmax(role_logits)[0]
            role_probabilities = {role.value: float(p) for role, p in zip(ROLES, probabilities, strict=True)}
        if pinned is not None:
            ranking = [pinned] + [name for name in ranking if name != pinned]
        return Route(
            ranking=ranking,
            role_probabilities=role_probabilities,
            confidence_threshold=self.pool.router.confidence,
        )

    def _limits(self, name: str) -> CallLimits:
        member, server = self.pool.member(name), self.pool.server
        return CallLimits(
            read_timeout_s=(member.timeout_s if member else None) or server.timeout_s,
            deadline_s=(member.deadline_s if member else None) or server.deadline_s,
            first_token_s=server.first_token_timeout_s,
        )

    def _candidates(self, ranking: list[str], attempts: list[dict[str, str]]) -> list[str]:
        """Each member at most once (no cycles), open circuits skipped, at most `max_attempts`."""
        candidates = []
        for name in ranking:
            if not self.breaker.available(name):
                attempts.append({"member": name, "outcome": "skipped: circuit open"})
                continue
            candidates.append(name)
        return candidates[: self.pool.server.max_attempts]

    def record_failure(self, name: str, error: MemberFailure, attempts: list[dict[str, str]]) -> None:
        message = self.redact(str(error))
        log.warning("member %s failed: %s", name, message)
        attempts.append({"member": name, "outcome": f"failed: {message}"})
        self.breaker.record_failure(name, error.retry_after_s)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    async def complete(
        self, ranking: list[str], messages: Messages, generation: Generation
    ) -> tuple[str, str, list[dict[str, str]]]:
        attempts: list[dict[str, str]] = []
        for name in self._candidates(ranking, attempts):
            try:
                text = await complete_within(self.backends[name], messages, generation, self._limits(name))
            except MemberFailure as error:
                self.record_failure(name, error, attempts)
                continue
            except RequestRejected as rejection:
                raise Refused(name, rejection) from None
            self.breaker.record_success(name)
            attempts.append({"member": name, "outcome": "answered"})
            return text, name, attempts
        raise NoMemberAnswered(attempts)

    async def open_stream(
        self, ranking: list[str], messages: Messages, generation: Generation
    ) -> tuple[str, str, AsyncIterator[str], list[dict[str, str]]]:
        """Fall back until a member yields its first piece; return (member, first piece, rest, attempts)."""
        attempts: list[dict[str, str]] = []
        for name in self._candidates(ranking, attempts):
            pieces = stream_within(self.backends[name], messages, generation, self._limits(name))
            try:
                first = await anext(pieces)
            except StopAsyncIteration:
                first = ""
            except MemberFailure as error:
                self.record_failure(name, error, attempts)
                continue
            except RequestRejected as rejection:
                raise Refused(name, rejection) from None
            attempts.append({"member": name, "outcome": "streaming"})
            return name, first, pieces, attempts
        raise NoMemberAnswered(attempts)

    async def answer(self, route: Route, messages: Messages, generation: Generation, pev: bool) -> Answer:
        if not pev or route.confident:
            text, member, attempts = await self.complete(route.ranking, messages, generation)
            return Answer(text, [member], attempts, "single")
        return await self._plan_execute_verify(route, messages, generation)

    def _by_role(self, route: Route, role: Role) -> list[str]:
        eligible = [name for name in route.ranking if role in self.pool.member(name).roles]  # type: ignore[union-attr]
        return eligible or route.ranking

    async def _plan_execute_verify(self, route: Route, messages: Messages, generation: Generation) -> Answer:
        question = messages[-1]["content"]
        all_attempts: list[dict[str, str]] = []
        answered: list[str] = []

        free_form = replace(
            generation, stop=()
        )  # plans and verdicts span lines; only the answer obeys `stop`

        async def step(role: Role, prompt_messages: Messages, options: Generation = free_form) -> str:
            text, member, attempts = await self.complete(self._by_role(route, role), prompt_messages, options)
            all_attempts.extend({**attempt, "role": role.value} for attempt in attempts)
            answered.append(member)
            return text

        plan = await step(
            Role.THINKER,
            [
                {
                    "role": "user",
                    "content": f"List short numbered steps to solve this. Do not solve it.\n\n{question}",
                }
            ],
        )
        worker_messages = [{"role": "system", "content": f"Follow this plan:\n{plan}"}, *messages]
        draft = await step(Role.WORKER, worker_messages, generation)
        verdict = await step(
            Role.VERIFIER,
            [
                {
                    "role": "user",
                    "content": f"Question:\n{question}\n\nProposed answer:\n{draft}\n\n"
                    "Reply ACCEPT if the answer is correct; otherwise reply REVISE: followed by what to fix.",
                }
            ],
        )
        if not verdict.strip().upper().startswith("ACCEPT"):
            revision_messages = [
                *worker_messages,
                {"role": "assistant", "content": draft},
                {"role": "user", "content": f"A reviewer says: {verdict}\nGive the corrected answer."},
            ]
            draft = await step(Role.WORKER, revision_messages, generation)
        return Answer(draft, list(dict.fromkeys(answered)), all_attempts, "plan_execute_verify")


def _configured_secrets(pool: Pool) -> list[str]:
    names = [pool.server.api_key_env] + [m.remote.api_key_env for m in pool.members if m.remote is not None]
    return [os.environ[name] for name in names if name and os.environ.get(name)]


# ---- HTTP ----


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
        if request.model not in (settings.model_name, *pool.names):
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
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        query = next(
            (m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"]
        )
        route = await conductor.route(
            query, pinned=None if request.model == settings.model_name else request.model
        )
        limit = request.max_completion_tokens or request.max_tokens or settings.max_tokens
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        generation = Generation(min(limit, settings.max_tokens), request.temperature, stop)
        pev = (
            settings.plan_execute_verify
            if request.plan_execute_verify is None
            else request.plan_execute_verify
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            if request.stream and not (pev and not route.confident):
                return await _stream_response(conductor, route, messages, generation, completion_id)
            answer = await conductor.answer(route, messages, generation, pev)
        except NoMemberAnswered as failure:
            return _no_member(failure)
        except Refused as refused:
            return _refused(conductor, refused)
        body = _completion_body(completion_id, settings.model_name, answer, route)
        headers = {MEMBERS_HEADER: ",".join(answer.members)}
        if request.stream:  # plan–execute–verify runs to the end, then streams the final answer as one chunk
            return StreamingResponse(_replay_as_stream(body), media_type="text/event-stream", headers=headers)
        return JSONResponse(body, headers=headers)

    return app


def _no_member(failure: NoMemberAnswered) -> JSONResponse:
    tried = "; ".join(f"{attempt['member']} {attempt['outcome']}" for attempt in failure.attempts)
    return error_response(503, f"no pool member could answer: {tried or 'no members'}", "service_unavailable")


def _refused(conductor: Conductor, refused: Refused) -> JSONResponse:
    rejection = refused.rejection
    message = conductor.redact(f"member {refused.member} refused the request: {rejection}")
    response = error_response(rejection.status, message, "invalid_request_error", rejection.code)
    response.headers[MEMBERS_HEADER] = refused.member
    return response


def _merger_field(
    answer_members: list[str], attempts: list[dict[str, str]], mode: str, route: Route
) -> dict[str, Any]:
    return {
        "members": answer_members,
        "attempts": attempts,
        "mode": mode,
        "ranking": route.ranking,
        "roles": route.role_probabilities,
    }


def _completion_body(completion_id: str, model: str, answer: Answer, route: Route) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": "stop"}
        ],
        "usage": None,
        "merger": _merger_field(answer.members, answer.attempts, answer.mode, route),
    }


def _chunk(
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


async def _replay_as_stream(body: dict[str, Any]) -> AsyncIterator[str]:
    message = body["choices"][0]["message"]
    extra = {"merger": body["merger"]}
    yield _chunk(body["id"], body["model"], {"role": "assistant", "content": message["content"]}, None, extra)
    yield _chunk(body["id"], body["model"], {}, "stop", extra)
    yield "data: [DONE]\n\n"


async def _stream_response(
    conductor: Conductor,
    route: Route,
    messages: Messages,
    generation: Generation,
    completion_id: str,
) -> StreamingResponse:
    member, first, pieces, attempts = await conductor.open_stream(route.ranking, messages, generation)
    model = conductor.pool.server.model_name
    extra = {"merger": _merger_field([member], attempts, "single", route)}

    async def events() -> AsyncIterator[str]:
        try:
            yield _chunk(completion_id, model, {"role": "assistant", "content": first}, None, extra)
            async for piece in pieces:
                yield _chunk(completion_id, model, {"content": piece}, None)
        except PastTokenCap as error:  # max_tokens pieces were relayed: the answer ends there
            conductor.record_failure(member, error, attempts)
            yield _chunk(completion_id, model, {}, "length", extra)
            yield "data: [DONE]\n\n"
            return
        except MemberFailure as error:
            # After the first token a fallback would splice two answers together; report instead.
            conductor.record_failure(member, error, attempts)
            message = f"member {member} broke its stream: {conductor.redact(str(error))}"
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'upstream_error'}})}\n\n"
            return
        finally:
            await close_quietly(pieces)  # also when the client went away mid-stream
        conductor.breaker.record_success(member)
        yield _chunk(completion_id, model, {}, "stop", extra)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={MEMBERS_HEADER: member})


def build_conductor(pool: Pool) -> Conductor:
    """Load the trained head, the encoder (lazily, on first request) and every member's backend.

    A one-member pool needs no head: it serves its member (with the breaker, timeouts and the same API),
    which is how a local model becomes a `remote:` member of a conductor on another machine. Nor does a
    pool with `routing: static`: its members are tried in `priority` order (or the members' order).
    """
    from merger.conductor.backends import build_backend
    from merger.router.embeddings import build_embedder
    from merger.router.training import load_head

    head, embedder = None, None
    if len(pool.members) > 1 and not pool.static_routing:
        try:
            head = load_head(pool)
        except MergerError as error:
            raise MergerError(
                f"{error}; or serve without a head, in a fixed order: `routing: static` in the pool "
                "(members' order, or a `priority:` list)"
            ) from None
        embedder = build_embedder(pool)
        if embedder.encoder_id != head.encoder_id:
            raise MergerError(
                f"the head was trained on {head.encoder_id!r} embeddings, the pool uses {embedder.encoder_id!r}"
            )
    backends = {member.name: build_backend(member, pool.registry_root) for member in pool.members}
    return Conductor(pool, head, embedder, backends)
