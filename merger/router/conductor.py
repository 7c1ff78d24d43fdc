"""The conductor: an OpenAI-compatible HTTP server that routes each request through the head, falls back
to the next-ranked member on errors and timeouts, and keeps a circuit breaker per member."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from merger.errors import MergerError
from merger.router.backends import Backend, Generation, MemberFailure, Messages
from merger.router.head import RouterHead, softmax
from merger.router.pool import ROLES, BreakerSettings, Pool, Role

log = logging.getLogger("merger.conductor")
MEMBERS_HEADER = "x-merger-members"
_BEARER = HTTPBearer(auto_error=False)  # module level: FastAPI resolves the string annotations here


# ---- request schema (OpenAI chat completions, the subset the conductor honours) ----


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    stream: bool = False
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    plan_execute_verify: bool | None = Field(
        default=None, description="merger extension: force plan–execute–verify on (true) or off (false)"
    )


# ---- circuit breaker ----


@dataclass
class _MemberHealth:
    failures: deque[float] = field(default_factory=deque)
    open_until: float = 0.0
    on_probation: bool = False  # cooled down after opening: the next failure reopens at once


class CircuitBreaker:
    """N failures within `window_s` open a member's circuit for `cooldown_s`. After the cooldown the member
    is tried again; one more failure reopens it at once, one success closes it."""

    def __init__(
        self, settings: BreakerSettings, names: Sequence[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._health = {name: _MemberHealth() for name in names}

    def available(self, name: str) -> bool:
        return self.clock() >= self._health[name].open_until

    def record_success(self, name: str) -> None:
        self._health[name] = _MemberHealth()

    def record_failure(self, name: str) -> None:
        health, now = self._health[name], self.clock()
        health.failures.append(now)
        while health.failures and now - health.failures[0] > self.settings.window_s:
            health.failures.popleft()
        if health.on_probation or len(health.failures) >= self.settings.failures:
            health.open_until = now + self.settings.cooldown_s
            health.failures.clear()
            health.on_probation = True
            log.warning("member %s: circuit open for %.0fs", name, self.settings.cooldown_s)

    def state(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "state": "closed" if self.available(name) else "open",
                "recent_failures": len(health.failures),
            }
            for name, health in self._health.items()
        }


# ---- routing and fallback ----


class NoMemberAnswered(Exception):
    def __init__(self, attempts: list[dict[str, str]]) -> None:
        super().__init__("no pool member answered")
        self.attempts = attempts


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
        self._embed_lock = asyncio.Lock()
        self.secrets = _configured_secrets(pool)

    async def route(self, query: str, pinned: str | None = None) -> Route:
        if self.head is None or self.embed is None:  # a one-member pool: nothing to choose
            return Route(ranking=list(self.pool.names), role_probabilities={Role.WORKER.value: 1.0})
        async with self._embed_lock:
            embedding = await asyncio.to_thread(self.embed, [query])
        scores, role_logits = self.head.forward(embedding)
        ranking = [self.head.members[i] for i in np.argsort(-scores[0], kind="stable")]
        if pinned is not None:
            ranking = [pinned] + [name for name in ranking if name != pinned]
        probabilities = softmax(role_logits)[0]
        roles = {role.value: float(p) for role, p in zip(ROLES, probabilities, strict=True)}
        return Route(
            ranking=ranking, role_probabilities=roles, confidence_threshold=self.pool.router.confidence
        )

    def _timeout(self, name: str) -> float:
        member = self.pool.member(name)
        return (member.timeout_s if member and member.timeout_s else None) or self.pool.server.timeout_s

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
        self.breaker.record_failure(name)

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
                text = await self.backends[name].complete(messages, generation, self._timeout(name))
            except MemberFailure as error:
                self.record_failure(name, error, attempts)
                continue
            self.breaker.record_success(name)
            attempts.append({"member": name, "outcome": "answered"})
            return text, name, attempts
        raise NoMemberAnswered(attempts)

    async def open_stream(
        self, ranking: list[str], messages: Messages, generation: Generation
    ) -> tuple[str, str, AsyncIterator[str], list[dict[str, str]]]:
        """Fall back until a member yields its first token; return (member, first piece, rest, attempts)."""
        attempts: list[dict[str, str]] = []
        first_token_timeout = self.pool.server.first_token_timeout_s
        for name in self._candidates(ranking, attempts):
            pieces = aiter(self.backends[name].stream(messages, generation, self._timeout(name)))
            try:
                first = await asyncio.wait_for(anext(pieces), first_token_timeout)
            except StopAsyncIteration:
                first = ""
            except TimeoutError:
                await _close(pieces)
                self.record_failure(
                    name, MemberFailure(f"no first token within {first_token_timeout:g}s"), attempts
                )
                continue
            except MemberFailure as error:
                self.record_failure(name, error, attempts)
                continue
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


async def _close(pieces: AsyncIterator[str]) -> None:
    closer = getattr(pieces, "aclose", None)
    if closer is not None:
        try:
            await closer()
        except Exception:  # the member already failed; closing is best effort
            log.debug("closing a failed stream raised", exc_info=True)


def _configured_secrets(pool: Pool) -> list[str]:
    names = [pool.server.api_key_env] + [m.remote.api_key_env for m in pool.members if m.remote is not None]
    return [os.environ[name] for name in names if name and os.environ.get(name)]


# ---- HTTP ----


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "code": status}}
    )


def _validation_message(error: RequestValidationError) -> str:
    problems = []
    for detail in error.errors():
        where = ".".join(str(part) for part in detail.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {detail.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems[:10])


def create_app(conductor: Conductor) -> FastAPI:
    pool = conductor.pool
    app = FastAPI(
        title="merger conductor", version="1", description="OpenAI-compatible router over a model pool"
    )
    expected_key = os.environ.get(pool.server.api_key_env, "") if pool.server.api_key_env else ""

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
        return _error(400, _validation_message(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "authentication_error" if error.status_code == 401 else "invalid_request_error"
        return _error(error.status_code, str(error.detail), kind)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "members": conductor.breaker.state()}

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict[str, Any]:
        ids = [pool.server.model_name, *pool.names]
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": "merger"} for i in ids],
        }

    @app.post(
        "/v1/chat/completions",
        dependencies=[Depends(require_key)],
        responses={
            400: {"description": "invalid request"},
            401: {"description": "missing or invalid API key"},
            404: {"description": "unknown model"},
            503: {"description": "no pool member could answer"},
        },
    )
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        if request.model not in (pool.server.model_name, *pool.names):
            return _error(
                404,
                f"unknown model {request.model!r}; use {pool.server.model_name!r} or a member name",
                "not_found_error",
            )
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        query = next(
            (m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"]
        )
        route = await conductor.route(
            query, pinned=None if request.model == pool.server.model_name else request.model
        )
        limit = request.max_completion_tokens or request.max_tokens or pool.server.max_tokens
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        generation = Generation(min(limit, pool.server.max_tokens), request.temperature, stop)
        pev = (
            pool.server.plan_execute_verify
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
        body = _completion_body(completion_id, pool.server.model_name, answer, route)
        headers = {MEMBERS_HEADER: ",".join(answer.members)}
        if request.stream:  # plan–execute–verify runs to the end, then streams the final answer as one chunk
            return StreamingResponse(_replay_as_stream(body), media_type="text/event-stream", headers=headers)
        return JSONResponse(body, headers=headers)

    return app


def _no_member(failure: NoMemberAnswered) -> JSONResponse:
    tried = "; ".join(f"{attempt['member']} {attempt['outcome']}" for attempt in failure.attempts)
    return _error(503, f"no pool member could answer: {tried or 'no members'}", "service_unavailable")


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
        yield _chunk(completion_id, model, {"role": "assistant", "content": first}, None, extra)
        try:
            async for piece in pieces:
                yield _chunk(completion_id, model, {"content": piece}, None)
        except MemberFailure as error:
            # After the first token a fallback would splice two answers together; report instead.
            conductor.record_failure(member, error, attempts)
            message = f"member {member} broke its stream: {conductor.redact(str(error))}"
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'upstream_error'}})}\n\n"
            return
        conductor.breaker.record_success(member)
        yield _chunk(completion_id, model, {}, "stop", extra)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={MEMBERS_HEADER: member})


def build_conductor(pool: Pool) -> Conductor:
    """Load the trained head, the encoder (lazily, on first request) and every member's backend.

    A one-member pool needs no head: it serves its member (with the breaker, timeouts and the same API),
    which is how a local model becomes a `remote:` member of a conductor on another machine.
    """
    from merger.router.backends import build_backend
    from merger.router.embeddings import build_embedder
    from merger.router.training import load_head

    head, embedder = None, None
    if len(pool.members) > 1:
        head = load_head(pool)
        embedder = build_embedder(pool)
        if embedder.encoder_id != head.encoder_id:
            raise MergerError(
                f"the head was trained on {head.encoder_id!r} embeddings, the pool uses {embedder.encoder_id!r}"
            )
    backends = {member.name: build_backend(member, pool.registry_root) for member in pool.members}
    return Conductor(pool, head, embedder, backends)
