"""mergekit as the reference: in-memory merges for checking the engine, and the final export."""

from __future__ import annotations

from pathlib import Path

import torch
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache
from mergekit.merge import _model_out_config, run_merge
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner


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
    run_merge(config, str(out_dir), options=options)
