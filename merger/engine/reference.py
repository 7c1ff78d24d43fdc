"""mergekit as the reference: in-memory merges for checking the engine, and the final export."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache
from mergekit.merge import _model_out_config, run_merge
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from merger.engine.logged_errors import raising_logged_errors
from merger.engine.weights import CandidateWeights


def _options(seed: int | None, trust_remote_code: bool, device: str = "cpu") -> MergeOptions:
    return MergeOptions(
        device=device,
        random_seed=seed,
        trust_remote_code=trust_remote_code,
        quiet=True,
        write_model_card=False,
        lazy_unpickle=False,
    )


def merge_in_memory(
    config: MergeConfiguration,
    *,
    seed: int | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """mergekit's merged tensors by name, without writing anything.

    `MergePlanner.plan_in_memory()` fails in mergekit 0.1.5 (it builds an abstract Task), so the
    planner's `_plan()` runs and its per-tensor tasks go to the Executor directly.
    """
    options = _options(seed, trust_remote_code, device)
    if seed is not None:
        torch.manual_seed(seed)
    config = config.model_copy(deep=True)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    planner = MergePlanner(
        config, arch_info, options=options, out_model_config=_model_out_config(config, arch_info)
    )
    planner._plan()
    names = {task: weight.name for weight, task in planner._tensors}
    executor = Executor(targets=list(names), math_device=device, storage_device="cpu")
    return {names[task]: value for task, value in executor.run(quiet=True)}


def export_merge(
    config: MergeConfiguration,
    out_dir: Path,
    *,
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Write the merged checkpoint exactly as `mergekit-yaml` would (weights, config, tokenizer)."""
    options = _options(seed, trust_remote_code).model_copy(update={"copy_tokenizer": True})
    with raising_logged_errors("mergekit.merge"):  # a failed tokenizer copy is only logged there
        run_merge(config, str(out_dir), options=options)


class MergekitEngine(CandidateWeights):
    """The search loop's engine backed by mergekit's own executor: every registered method, correct first.

    Each candidate is merged by mergekit in memory and copied into one resident model. Random methods
    draw with the run's seed for every candidate (common random numbers), or with `fresh_randomness` a
    seed keyed by the candidate's draw (`factory.draw_key`), the same in every process.
    """

    def __init__(
        self,
        sources: Mapping[str, Path],
        base: str | None,
        *,
        dtype: torch.dtype,
        device: str,
        seed: int,
        fresh_randomness: bool = False,
        allow_nonfinite: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        from merger.engine.weights import check_checkpoint_finite

        if not allow_nonfinite:  # mergekit reads the sources per candidate: one pass over them here
            for name, path in sources.items():
                check_checkpoint_finite(name, Path(path))
        self.seed = seed
        self.fresh_randomness = fresh_randomness
        first = sources[base] if base else next(iter(sources.values()))
        self.model = AutoModelForCausalLM.from_pretrained(first, dtype=dtype).to(device).eval()
        self.num_layers = int(self.model.config.num_hidden_layers)
        self.device = device

    def apply_config(self, config: MergeConfiguration, draw: int = 0) -> None:
        seed = (self.seed + draw) % 2**63 if self.fresh_randomness else self.seed
        merged = merge_in_memory(config, seed=seed, device=self.device)
        parameters = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in merged.items():
                if name in parameters:  # a tied lm_head is the embeddings' parameter
                    parameters[name].data.copy_(tensor)
