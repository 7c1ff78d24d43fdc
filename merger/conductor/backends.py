"""What actually produces text for a pool member: a local transformers model or a remote OpenAI endpoint."""

from __future__ import annotations

import asyncio
import email.utils
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from merger.common.errors import MergerError, shown
from merger.router.pool import Member
from merger.sources.members import member_checkpoint

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


# upstream statuses about the request, not the member (401/403/404/408/429 and 5xx are the member's)
REQUEST_ERROR_STATUSES = frozenset({400, 413, 415, 422})


class Backend(Protocol):
    name: str

    async def complete(self, messages: Messages, generation: Generation, timeout_s: float) -> str: ...

    def stream(self, messages: Messages, generation: Generation, timeout_s: float) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...


class LocalBackend:
    """A transformers causal LM in this process; one generation at a time per model."""

    def __init__(self, name: str, checkpoint: Path, chat_template: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.chat_template = chat_template
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        self._lock = threading.Lock()
        self._context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def _prompt_ids(self, messages: Messages, max_tokens: int) -> Any:
        if self.chat_template and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        elif len(messages) == 1 and messages[0]["role"] == "user" and messages[0]["content"]:
            text = messages[0]["content"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        keep = max(1, self._context - max_tokens)
        return ids[:, -keep:]  # the most recent context when the conversation outgrows the model

    def _generate_kwargs(
        self, messages: Messages, generation: Generation, cancel: threading.Event
    ) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        max_tokens = max(1, min(generation.max_tokens, self._context - 1))
        temperature = generation.temperature
        sampling = temperature is not None and temperature > 0
        kwargs: dict[str, Any] = {
            "input_ids": self._prompt_ids(messages, max_tokens),
            "max_new_tokens": max_tokens,
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
            "stopping_criteria": StoppingCriteriaList([_stop_when_set(cancel)]),
        }
        kwargs["attention_mask"] = kwargs["input_ids"].new_ones(kwargs["input_ids"].shape)
        if sampling:
            kwargs["temperature"] = temperature
        if generation.stop:
            kwargs.update(
                stop_strings=[sequence for sequence in generation.stop if sequence], tokenizer=self.tokenizer
            )
        return kwargs

    def _complete_blocking(self, messages: Messages, generation: Generation, cancel: threading.Event) -> str:
        import torch

        kwargs = self._generate_kwargs(messages, generation, cancel)
        with self._lock, torch.no_grad():
            output = self.model.generate(**kwargs)
        new_tokens = output[0, kwargs["input_ids"].shape[1] :]
        return cut_at_stop(self.tokenizer.decode(new_tokens, skip_special_tokens=True), generation.stop)[0]

    async def complete(self, messages: Messages, generation: Generation, timeout_s: float) -> str:
        cancel = threading.Event()  # set however this ends: a timed-out or cancelled call stops generating
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._complete_blocking, messages, generation, cancel), timeout_s
            )
        except TimeoutError:
            raise MemberFailure(f"timed out after {timeout_s:g}s") from None
        except MemberFailure:
            raise
        except Exception as error:
            raise MemberFailure(f"{type(error).__name__}: {error}") from error
        finally:
            cancel.set()

    async def stream(
        self, messages: Messages, generation: Generation, timeout_s: float
    ) -> AsyncIterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout_s
        )
        cancel = threading.Event()  # set when this generator ends, however: generation stops with it
        kwargs = {**self._generate_kwargs(messages, generation, cancel), "streamer": streamer}
        failure: list[BaseException] = []

        def run() -> None:
            import torch

            try:
                with self._lock, torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as error:  # reported through the stream below
                failure.append(error)
                streamer.end()

        threading.Thread(target=run, daemon=True, name=f"generate-{self.name}").start()
        sentinel = object()
        held = ""  # text that might be the start of a stop sequence
        longest_stop = max((len(sequence) for sequence in generation.stop), default=0)
        try:
            while True:
                try:
                    piece = await asyncio.to_thread(next, streamer, sentinel)
                except Exception as error:  # queue.Empty on timeout
                    raise MemberFailure(f"no token within {timeout_s:g}s ({type(error).__name__})") from None
                if failure:
                    raise MemberFailure(f"{type(failure[0]).__name__}: {failure[0]}")
                if piece is sentinel:
                    if held:
                        yield held
                    return
                held, stopped = cut_at_stop(held + str(piece), generation.stop)
                if stopped:
                    if held:
                        yield held
                    return
                ready = len(held) - max(0, longest_stop - 1)
                if ready > 0:
                    yield held[:ready]
                    held = held[ready:]
        finally:
            cancel.set()

    async def close(self) -> None:
        return None


def _stop_when_set(cancel: threading.Event) -> Any:
    """A stopping criterion that ends generation at the next token once `cancel` is set."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full(
                (input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StopWhenSet()


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


def build_backend(member: Member, registry_root: Path | None = None) -> Backend:
    if member.remote is not None:
        return RemoteBackend(member)
    try:
        return LocalBackend(member.name, member_checkpoint(member, registry_root), member.chat_template)
    except MergerError:
        raise
    except Exception as error:
        raise MergerError(f"member {member.name!r} could not be loaded: {error}") from error
