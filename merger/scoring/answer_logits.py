"""Teacher-forced scoring with the output head applied only where the answer is.

lm-eval's HFLM scores a (context, continuation) request by running the whole model, output head
included, over every position of context + continuation, then keeping the continuation's positions.
For a short answer after a longer prompt most of the head's work (hidden x vocab per position) is
thrown away. Here the model's body runs over every position, as it must, and the head runs only at
the positions that predict continuation tokens.

lm-eval keeps its batching and its reading of the logits (`merger.scoring.lm_eval_bridge`): the logits
come back as a window over the last positions of the padded batch, from the earliest answer start to
the end, which lm-eval slices as it slices prefix-tuned models' logits. Positions of that window that
predict no answer of their row are zeros, and never read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PAD_TOKEN = 0  # lm-eval right-pads its loglikelihood batches with zeros (`pad_and_concat`)

# Models whose logits are exactly `lm_head(base_model(input_ids).last_hidden_state)`: no scaling,
# soft-capping or other head of their own. Any other class (a subclass included) is scored by HFLM's path.
KNOWN_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})

AnswerLengths = dict[tuple[int, ...], int]  # a model input (token ids) -> the longest answer scored on it
Span = tuple[int, int]  # [start, end) positions of one row whose logits predict the answer's tokens


def answer_lengths(requests: Sequence[tuple[object, list[int], list[int]]], max_length: int) -> AnswerLengths:
    """For each input lm-eval builds from a (key, context, continuation) request (context + continuation,
    left-truncated to `max_length` + 1 tokens, last token dropped), the longest continuation on it."""
    lengths: AnswerLengths = {}
    for _, context, continuation in requests:
        model_input = tuple((context + continuation)[-(max_length + 1) :][:-1])
        lengths[model_input] = max(lengths.get(model_input, 0), len(continuation))
    return lengths


def answer_spans(row: Sequence[int], lengths: AnswerLengths) -> list[Span]:
    """The answer positions of a right-padded batch row, for every known input it can be.

    A real input may itself end in the pad token, so each unpadded length that is a known input counts;
    scoring extra positions costs a little, missing one would be wrong. Empty if the row is no known input.
    """
    spans = []
    for end in range(len(row), 0, -1):
        answer_length = lengths.get(tuple(row[:end]))
        if answer_length is not None:
            spans.append((end - answer_length, end))
        if row[end - 1] != PAD_TOKEN:
            break
    return spans


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder body and output head of a model of a known structure, else None."""
    if type(model).__name__ not in KNOWN_ARCHITECTURES:
        return None
    body, head = getattr(model, "base_model", model), model.get_output_embeddings()  # type: ignore[operator]
    if body is model or not isinstance(head, nn.Linear):
        return None
    return body, head


def answer_logits(body: nn.Module, head: nn.Linear, inputs: torch.Tensor, spans: Sequence[list[Span]]) -> torch.Tensor:
    """Logits [batch, window, vocab] over the batch's last positions, from the earliest answer start on,
    with the head applied only at each row's answer positions (zeros elsewhere)."""
    start = min(span_start for row_spans in spans for span_start, _ in row_spans)
    hidden = body(input_ids=inputs).last_hidden_state[:, start:]
    wanted = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    for row, row_spans in enumerate(spans):
        for span_start, span_end in row_spans:
            wanted[row, span_start - start : span_end - start] = True
    answer_positions = head(hidden[wanted])
    logits = answer_positions.new_zeros(*wanted.shape, answer_positions.shape[-1])
    logits[wanted] = answer_positions
    return logits
