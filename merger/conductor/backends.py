"""What produces text for a pool member, as the conductor sees it: the `Backend` protocol, the generation a
request asks for, and the two ways a member call fails. The backends themselves: `local_backend` (a
transformers model in this process) and `remote_backend` (an OpenAI-compatible endpoint)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    """What the request asks of the generation, whoever answers it."""

    max_tokens: int
    temperature: float | None = None
    stop: tuple[str, ...] = ()


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop sequence (OpenAI semantics: the stop sequence is not returned)."""
    positions = [text.find(sequence) for sequence in stop if sequence and sequence in text]
    return (text[: min(positions)], True) if positions else (text, False)


class MemberFailure(Exception):
    """A member could not answer (error, timeout, broken stream); the conductor falls back.
    `retry_after_s`: how long the member asked to be left alone (a 429's Retry-After)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestRejected(Exception):
    """A member refused the request itself (400, 413, 422...): the client gets that answer; another member
    would refuse it too, and the member is not at fault."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Backend(Protocol):
    name: str

    async def complete(self, messages: Messages, generation: Generation, timeout_s: float) -> str: ...

    def stream(self, messages: Messages, generation: Generation, timeout_s: float) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...
