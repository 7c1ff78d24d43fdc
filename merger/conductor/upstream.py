"""One member call under a whole-call deadline; a stream relays at most `max_tokens` pieces.

The openai client's timeout bounds each read, so an upstream that trickles a byte at a time, or streams
forever, would hold a request without end: the deadline bounds the call as a whole. Both an expired
deadline and a stream past the token cap are member failures. A cancelled call (the client went away)
is neither: CancelledError passes through untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from merger.conductor.backends import Backend, Generation, MemberFailure, Messages

log = logging.getLogger("merger.conductor")


class PastTokenCap(MemberFailure):
    """The member kept streaming after `max_tokens` pieces: what was relayed stands, the rest is cut."""


@dataclass(frozen=True)
class CallLimits:
    read_timeout_s: float  # per read, as the openai client applies it
    deadline_s: float  # the call as a whole
    first_token_s: float  # streams: until the first piece


async def complete_within(
    backend: Backend, messages: Messages, generation: Generation, limits: CallLimits
) -> str:
    try:
        async with asyncio.timeout(limits.deadline_s):
            return await backend.complete(messages, generation, min(limits.read_timeout_s, limits.deadline_s))
    except TimeoutError:
        raise MemberFailure(f"no answer within the {limits.deadline_s:g}s deadline") from None


async def stream_within(
    backend: Backend, messages: Messages, generation: Generation, limits: CallLimits
) -> AsyncIterator[str]:
    """The member's pieces, each awaited no later than the call's deadline (the first no later than
    `first_token_s`); a piece past `generation.max_tokens` raises PastTokenCap. The upstream stream is
    closed however this ends."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline_at = started + limits.deadline_s
    pieces = aiter(backend.stream(messages, generation, min(limits.read_timeout_s, limits.deadline_s)))
    relayed = 0
    try:
        while True:
            first = relayed == 0
            wait_until = min(deadline_at, started + limits.first_token_s) if first else deadline_at
            try:
                async with asyncio.timeout_at(wait_until):
                    piece = await anext(pieces)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if first and wait_until < deadline_at:
                    raise MemberFailure(f"no first token within {limits.first_token_s:g}s") from None
                raise MemberFailure(f"stream still open at the {limits.deadline_s:g}s deadline") from None
            relayed += 1
            if relayed > generation.max_tokens:
                raise PastTokenCap(f"streamed past max_tokens {generation.max_tokens}")
            yield piece
    finally:
        await close_quietly(pieces)


async def close_quietly(pieces: AsyncIterator[str]) -> None:
    closer = getattr(pieces, "aclose", None)
    if closer is not None:
        try:
            await closer()
        except Exception:  # the member already failed; closing is best effort
            log.debug("closing a member's stream raised", exc_info=True)
