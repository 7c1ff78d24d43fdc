"""A pool member answered by a transformers causal LM in this process: one generation at a time per model,
stopped at the next token when its call ends (timed out, cancelled, or the stream closed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from merger.conductor.backends import Generation, MemberFailure, Messages, cut_at_stop


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
