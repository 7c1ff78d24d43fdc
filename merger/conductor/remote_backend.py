"""A pool member answered by an OpenAI-compatible endpoint through the official client, and how its errors
are told apart: the request's fault (passed on to the client) or the member's (fallback, breaker)."""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from merger.common.errors import MergerError, shown
from merger.conductor.backends import Generation, MemberFailure, Messages, RequestRejected
from merger.router.pool import Member

# upstream statuses about the request, not the member (401/403/404/408/429 and 5xx are the member's)
REQUEST_ERROR_STATUSES = frozenset({400, 413, 415, 422})


class RemoteBackend:
    """An OpenAI-compatible endpoint through the official client; the key comes from the environment."""

    def __init__(self, member: Member) -> None:
        import openai

        assert member.remote is not None
        self.name = member.name
        self._model = member.remote.model
        key = os.environ.get(member.remote.api_key_env, "") if member.remote.api_key_env else ""
        if member.remote.api_key_env and not key:
            raise MergerError(
                f"member {member.name!r}: remote.api_key_env names {shown(member.remote.api_key_env)}, "
                "which is not set"
            )
        self._client = openai.AsyncOpenAI(
            base_url=member.remote.base_url, api_key=key or "none", max_retries=0
        )

    def _arguments(self, messages: Messages, generation: Generation) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "max_tokens": generation.max_tokens,
        }
        if generation.temperature is not None:
            arguments["temperature"] = generation.temperature
        if generation.stop:
            arguments["stop"] = list(generation.stop)
        return arguments

    async def complete(self, messages: Messages, generation: Generation, timeout_s: float) -> str:
        try:
            response = await self._client.chat.completions.create(
                **self._arguments(messages, generation), timeout=timeout_s
            )
            content = response.choices[0].message.content
            used = response.usage.completion_tokens if response.usage else None
        except Exception as error:
            raise _classified(error) from None
        if content is None:
            raise MemberFailure("the endpoint returned no message content")
        if used is not None and used > generation.max_tokens:
            raise MemberFailure(f"answered {used} tokens, past max_tokens {generation.max_tokens}")
        return content

    async def stream(
        self, messages: Messages, generation: Generation, timeout_s: float
    ) -> AsyncIterator[str]:
        try:
            chunks = await self._client.chat.completions.create(
                **self._arguments(messages, generation), stream=True, timeout=timeout_s
            )
            received = 0
            async with chunks:  # closes the upstream response however this generator ends
                async for chunk in chunks:
                    received += 1
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
            if not received:  # not even a role or a finish_reason: not an event stream at all
                raise MemberFailure("the stream ended without a single chunk")
        except Exception as error:
            raise _classified(error) from None

    async def close(self) -> None:
        await self._client.close()


def _safe_message(error: Exception) -> str:
    """The first line of an upstream error, short; the client never puts request headers in it."""
    return str(error).splitlines()[0][:200] if str(error) else ""


def _classified(error: Exception) -> Exception:
    """A request error (passed on to the client) or a member failure (fallback, breaker)."""
    import openai

    if isinstance(error, MemberFailure | RequestRejected):
        return error
    if isinstance(error, openai.APIStatusError):
        if error.status_code in REQUEST_ERROR_STATUSES:
            body = error.body if isinstance(error.body, dict) else {}
            detail = body.get("error", body) if isinstance(body.get("error", body), dict) else body
            message = str(detail.get("message") or _safe_message(error))[:500]
            code = detail.get("code")
            return RequestRejected(error.status_code, message, code if isinstance(code, str) else None)
        retry_after = retry_after_seconds(error.response.headers) if error.status_code == 429 else None
        return MemberFailure(f"{type(error).__name__}: {_safe_message(error)}", retry_after)
    return MemberFailure(f"{type(error).__name__}: {_safe_message(error)}")


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` (seconds or an HTTP date) or `retry-after-ms`, in seconds; None when absent or bad."""
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        if value.strip().isdigit():
            return float(value)
        moment = email.utils.parsedate_to_datetime(value)
        return max(0.0, moment.timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None
