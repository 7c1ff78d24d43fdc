from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny_models import build_sources, write_tasks  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, specialist1, specialist2: tiny random Llama checkpoints (4 layers, hidden 32)."""
    return build_sources(tmp_path_factory.mktemp("tiny_sources"))


@pytest.fixture(scope="session")
def tiny_evals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of lm-eval task YAML (tiny_mc, tiny_gen) with their local jsonl."""
    evals_dir = tmp_path_factory.mktemp("tiny_evals")
    write_tasks(evals_dir)
    return evals_dir


@pytest.fixture(autouse=True)
def no_stop_left_asked() -> Iterator[None]:
    """A test that signals a run in this process leaves no stop asked for behind it."""
    from merger.common.stopping import clear_stop

    yield
    clear_stop()
