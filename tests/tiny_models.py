"""Tiny, random Llama-family checkpoints and lm-eval tasks for offline CPU tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
NUM_LAYERS = 4


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"Q: what is {a} plus {b}? A: {a + b}")
        lines.append(f"The capital of {rng.choice(COUNTRIES)} is {rng.choice(CAPITALS)}.")
    return lines


COUNTRIES = ["France", "Spain", "Italy", "Peru", "Chile", "Japan", "Kenya", "Egypt"]
CAPITALS = ["Paris", "Madrid", "Rome", "Lima", "Santiago", "Tokyo", "Nairobi", "Cairo"]


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in milliseconds on a fixed corpus."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(vocab_size: int, num_layers: int = NUM_LAYERS) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_model(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    base: LlamaForCausalLM | None = None,
    delta_scale: float = 0.5,
    num_layers: int = NUM_LAYERS,
) -> LlamaForCausalLM:
    """A random model, or `base` plus a seeded random task vector of relative size `delta_scale`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), num_layers))
    if base is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                reference = base.get_parameter(name)
                noise = torch.randn_like(reference) * reference.std().clamp_min(1e-3) * delta_scale
                param.copy_(reference + noise)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def build_sources(root: Path, num_specialists: int = 2) -> dict[str, Path]:
    """A base and `num_specialists` fine-tune-like variants of it, saved as HF checkpoints."""
    tokenizer = build_tokenizer(root / "tokenizer")
    base = build_model(root / "base", tokenizer, seed=0)
    paths = {"base": root / "base"}
    for index in range(num_specialists):
        name = f"specialist{index + 1}"
        build_model(root / name, tokenizer, seed=index + 1, base=base)
        paths[name] = root / name
    return paths


def with_tensor_filled(source: Path, out: Path, tensor: str, value: float) -> Path:
    """A copy of the checkpoint `source` in `out`, every element of `tensor` set to `value`."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for item in source.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    tensors = load_file(out / "model.safetensors")
    tensors[tensor] = torch.full_like(tensors[tensor], value)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _mc_row(rng: random.Random, operation: str = "plus") -> dict[str, object]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    right = a + b if operation == "plus" else a - b
    wrong = right + rng.choice([-3, -1, 2, 5])
    label = rng.randint(0, 1)
    choices = [str(right), str(wrong)] if label == 0 else [str(wrong), str(right)]
    return {"question": f"Q: what is {a} {operation} {b}? A:", "choices": choices, "label": label}


def write_tasks(evals_dir: Path, num_items: int = 24) -> dict[str, Path]:
    """Two tiny lm-eval tasks on local jsonl: a multiple-choice one and a generation one."""
    rng = random.Random(1)
    evals_dir.mkdir(parents=True, exist_ok=True)
    mc_rows, gen_rows = [], []
    for _ in range(num_items):
        mc_rows.append(_mc_row(rng))
        index = rng.randrange(len(COUNTRIES))
        gen_rows.append({"question": f"The capital of {COUNTRIES[index]} is", "answer": CAPITALS[index]})
    files = {}
    for name, rows in (("tiny_mc", mc_rows), ("tiny_gen", gen_rows)):
        data = evals_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files[name] = data
    _write_mc_yaml(evals_dir, "tiny_mc", files["tiny_mc"])
    (evals_dir / "tiny_gen.yaml").write_text(
        f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files['tiny_gen']}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
    )
    return files


def write_mc_task(evals_dir: Path, name: str, operation: str, seed: int, num_items: int = 24) -> Path:
    """One more tiny multiple-choice task (`plus` or `minus` questions), its items drawn with `seed`."""
    rng = random.Random(seed)
    evals_dir.mkdir(parents=True, exist_ok=True)
    data = evals_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(_mc_row(rng, operation)) + "\n" for _ in range(num_items)))
    return _write_mc_yaml(evals_dir, name, data)


def _write_mc_yaml(evals_dir: Path, name: str, data: Path) -> Path:
    path = evals_dir / f"{name}.yaml"
    path.write_text(
        f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    return path
