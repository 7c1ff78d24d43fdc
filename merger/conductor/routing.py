"""Routing and fallback: rank the pool for a prompt (the trained head, or a static order), then call the
members in that order until one answers, each under its deadline, skipping open circuits, each member at
most once and at most `max_attempts` of them. A member's failure is recorded (breaker, attempts); a
member's refusal of the request itself ends the fallback: another member would refuse it too."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from merger.common.errors import MergerError
from merger.conductor.backend_factory import build_backend
from merger.conductor.backends import (
    Backend,
    Generation,
    MemberFailure,
    Messages,
    RequestRejected,
)
from merger.conductor.breaker import CircuitBreaker
from merger.conductor.upstream import CallLimits, complete_within, stream_within
from merger.router.head import RouterHead, softmax
from merger.router.pool import ROLES, Pool, Role

log = logging.getLogger("merger.conductor")
# the encoders read at most 256 tokens; routing embeds this much of the prompt, however long it is
ROUTED_PREFIX_CHARS = 8192
Attempts = list[dict[str, str]]  # per member tried: {"member": ..., "outcome": ...}


class NoMemberAnswered(Exception):
    def __init__(self, attempts: Attempts) -> None:
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

    def _candidates(self, ranking: list[str], attempts: Attempts) -> list[str]:
        """Each member at most once (no cycles), open circuits skipped, at most `max_attempts`."""
        candidates = []
        for name in ranking:
            if not self.breaker.available(name):
                attempts.append({"member": name, "outcome": "skipped: circuit open"})
                continue
            candidates.append(name)
        return candidates[: self.pool.server.max_attempts]

    def record_failure(self, name: str, error: MemberFailure, attempts: Attempts) -> None:
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
    ) -> tuple[str, str, Attempts]:
        attempts: Attempts = []
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
    ) -> tuple[str, str, AsyncIterator[str], Attempts]:
        """Fall back until a member yields its first piece; return (member, first piece, rest, attempts)."""
        attempts: Attempts = []
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


def _configured_secrets(pool: Pool) -> list[str]:
    names = [pool.server.api_key_env] + [m.remote.api_key_env for m in pool.members if m.remote is not None]
    return [os.environ[name] for name in names if name and os.environ.get(name)]


def build_conductor(pool: Pool) -> Conductor:
    """Load the trained head, the encoder (lazily, on first request) and every member's backend.

    A one-member pool needs no head: it serves its member (with the breaker, timeouts and the same API),
    which is how a local model becomes a `remote:` member of a conductor on another machine. Nor does a
    pool with `routing: static`: its members are tried in `priority` order (or the members' order).
    """
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
    backends = {
        member.name: build_backend(member, pool.registry_root, pool.exports_dir) for member in pool.members
    }
    return Conductor(pool, head, embedder, backends)
