"""Teacher-forced requests scored with the output head only at the answer's positions give lm-eval's
HFLM's own (log-probability, is-greedy) per request, on batches that mix prompt lengths (padding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from merger.scoring.answer_logits import answer_lengths, answer_spans, body_and_head
from merger.scoring.fitness import load_tokenizer
from merger.scoring.lm_eval_bridge import quiet_lm

PROMPTS = [
    "Q: what is 3 plus 4? A:",
    "The capital of France is Paris. The capital of Spain is Madrid. Q: what is 12 plus 30? A:",
    "Q: what is 7 plus 8? A:",
    "The capital of Peru is",
    "The capital of Japan is Tokyo. The capital of Kenya is",
    "Q: what is 99 plus 1? A:",
    "The capital of Egypt is Cairo. Q: what is 5 plus 5? A: 10 Q: what is 6 plus 6? A:",
]
ANSWERS = [" 7", " 42\n", " 15", " Lima.", " Nairobi", " 100", " 12"]


def requests() -> list[Instance]:
    """Each prompt with its answer, and with every other prompt's answer (one-token continuations on a
    shared context included, which lm-eval scores from one forward pass)."""
    pairs = [(prompt, answer) for prompt in PROMPTS for answer in ANSWERS]
    return [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0, metadata=("tiny", index, 1))
        for index, pair in enumerate(pairs)
    ]


def head_rows(model: LlamaForCausalLM, lm: object) -> tuple[list[tuple[float, bool]], int]:
    """lm's answers to `requests()`, and how many positions went through the model's output head."""
    rows = 0

    def count(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        nonlocal rows
        rows += inputs[0].shape[:-1].numel()

    handle = model.get_output_embeddings().register_forward_pre_hook(count)
    try:
        return lm.loglikelihood(requests()), rows  # type: ignore[attr-defined]
    finally:
        handle.remove()


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_answer_only_logits_match_hflm_item_by_item(tiny_sources: dict[str, Path], batch_size: int) -> None:
    checkpoint = tiny_sources["specialist1"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(checkpoint)
    plain, full_rows = head_rows(model, quiet_lm(model, tokenizer, batch_size, answer_logits_only=False))
    answer_only, answer_rows = head_rows(model, quiet_lm(model, tokenizer, batch_size))

    assert len(answer_only) == len(plain) == len(PROMPTS) * len(ANSWERS)
    assert torch.allclose(
        torch.tensor([ll for ll, _ in answer_only], dtype=torch.float64),
        torch.tensor([ll for ll, _ in plain], dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )
    assert [greedy for _, greedy in answer_only] == [greedy for _, greedy in plain]
    assert answer_rows < full_rows / 3, "the head ran over prompt positions too"


def test_greedy_answers_are_recognised(tiny_sources: dict[str, Path]) -> None:
    """is_greedy is True where the answer tokens are the model's own greedy continuation, on both paths."""
    checkpoint = tiny_sources["base"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(checkpoint)
    short, long = (tokenizer(prompt)["input_ids"] for prompt in (PROMPTS[0], PROMPTS[1]))
    greedy = model.generate(torch.tensor([long]), max_new_tokens=3, do_sample=False)[0, len(long) :].tolist()
    token_requests = [(None, long, greedy), (None, short, greedy), (None, long, greedy[:1]), (None, short, [9, 9])]
    plain = quiet_lm(model, tokenizer, 4, answer_logits_only=False)._loglikelihood_tokens(token_requests)
    answer_only = quiet_lm(model, tokenizer, 4)._loglikelihood_tokens(token_requests)
    assert [greedy for _, greedy in answer_only] == [greedy for _, greedy in plain]
    assert answer_only[0][1] and answer_only[2][1]
    assert torch.allclose(torch.tensor([ll for ll, _ in answer_only]), torch.tensor([ll for ll, _ in plain]))


class DoubledLogitsLlama(LlamaForCausalLM):
    """A model whose logits are not its head's output alone (as soft-capped or scaled heads are)."""

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output


def test_an_unknown_structure_is_scored_by_hflm(tiny_sources: dict[str, Path]) -> None:
    checkpoint = tiny_sources["specialist2"]
    model = DoubledLogitsLlama.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert body_and_head(model) is None
    tokenizer = load_tokenizer(checkpoint)
    plain = quiet_lm(model, tokenizer, 4, answer_logits_only=False).loglikelihood(requests())
    answer_only = quiet_lm(model, tokenizer, 4).loglikelihood(requests())
    assert answer_only == plain


def test_a_row_that_ends_in_the_pad_token_is_read_both_ways() -> None:
    """A padded row [5, 6, 0] is the input [5, 6, 0] or [5, 6] plus padding: both answers are kept."""
    lengths = answer_lengths([(None, [5], [6, 0, 9]), (None, [5], [6, 8]), (None, [7], [7])], max_length=16)
    assert lengths == {(5, 6, 0): 3, (5, 6): 2, (7,): 1}
    assert answer_spans([5, 6, 0], lengths) == [(0, 3), (0, 2)]
    assert answer_spans([5, 6, 0, 0], lengths) == [(0, 3), (0, 2)]
    assert answer_spans([7, 0, 0], lengths) == [(0, 1)]
    assert answer_spans([9, 9, 0], lengths) == []
