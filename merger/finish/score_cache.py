"""Final scores shared between runs (opt-in: `MERGER_SCORE_CACHE=DIR`).

Runs of one recipe with other seeds score the same sources and the same untuned baselines on the same
items; scoring is deterministic, so a score kept under a key that names everything it depends on is
the score a run would compute again. The key: the weights' identity (a source's weights digest, a
merge's config digest and the digests of every source it reads), the eval set as the recipe gives it,
the tokenizer's weights digest, the scoring precision, the engine's dtype and device, torch's thread
count, and the versions of merger, lm-eval, transformers and torch. One JSON file a key, written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from merger.common.files import write_atomic
from merger.executors import Scored
from merger.scoring.fitness import eval_sets
from merger.search.open import OpenRun

SCORE_CACHE_ENV = "MERGER_SCORE_CACHE"
PACKAGES = ("merger", "lm_eval", "transformers", "torch")


class ScoreCache:
    def __init__(self, root: Path, run: OpenRun):
        self.root = root
        recipe = run.recipe
        meta = run.meta
        lineage = meta.lineage
        self.context = {
            "sources": {name: lineage[name].sha256 for name in recipe.source_names},
            "tokenizer": lineage[recipe.tokenizer_name].sha256,
            "precision": meta.scoring_precision,
            "dtype": recipe.engine.dtype,
            "device": recipe.engine.device,
            # bf16 kernels split their sums by thread: the same merge scored with 1 and 2 threads differed on
            # a few test items of the multi-skill zoo (issue 30)
            "threads": torch.get_num_threads(),
            "versions": {name: version(name.replace("_", "-")) for name in PACKAGES},
            "task_paths": list(recipe.task_paths),
        }
        self.sets = {name: eval_set.model_dump(mode="json") for name, eval_set in eval_sets(recipe).items()}

    @classmethod
    def from_env(cls, run: OpenRun) -> ScoreCache | None:
        root = os.environ.get(SCORE_CACHE_ENV)
        return cls(Path(root), run) if root else None

    def _path(self, identity: str, set_name: str) -> Path:
        key = json.dumps({"identity": identity, "set": self.sets[set_name], **self.context}, sort_keys=True)
        return self.root / (hashlib.sha256(key.encode()).hexdigest() + ".json")

    def get(self, identity: str, set_name: str) -> Scored | None:
        path = self._path(identity, set_name)
        if not path.is_file():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        stored = data["values"] if "values" in data else data["items"]  # "items": written before the rename
        values = {task: {int(doc): value for doc, value in docs.items()} for task, docs in stored.items()}
        return Scored(data["scores"], values)

    def put(self, identity: str, set_name: str, scored: Scored) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(identity, set_name), json.dumps(scored._asdict()).encode())
