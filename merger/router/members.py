"""Where a pool member's weights live, and a key that changes exactly when they change."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from merger.common.errors import MergerError
from merger.common.files import publish_directory, staging_dir, write_atomic
from merger.common.references import REGISTRY_PREFIX, ZOO_PREFIX
from merger.common.yamlsafe import read_yaml_file
from merger.registry.files import WEIGHT_SUFFIXES, weight_files
from merger.router.pool import RUN_BASELINE_PREFIX, RUN_BEST_BASELINE, RUN_WINNER, Member
from merger.rundir.layout import RunDir
from merger.rundir.summary import Summary
from merger.sources.digest import remembered_digest
from merger.sources.resolve import resolve_path


def member_reference(member: Member) -> str:
    """The source reference of a `path:`, `registry:` or `zoo:` member."""
    if member.run is not None:
        raise MergerError(f"member {member.name!r} is a run's model, not a source reference")
    if member.path is not None:
        return str(member.path)
    if member.registry is not None:
        return REGISTRY_PREFIX + member.registry.removeprefix(REGISTRY_PREFIX)
    if member.zoo is not None:
        return ZOO_PREFIX + member.zoo
    raise MergerError(f"member {member.name!r} is remote and has no local checkpoint")


def member_checkpoint(
    member: Member, registry_root: Path | None = None, exports_dir: Path | None = None
) -> Path:
    """The local checkpoint directory of a `path:`, `registry:`, `zoo:` or `run:` member (a run's baseline
    is exported under `exports_dir` on first need)."""
    if member.run is not None:
        return run_member_checkpoint(member, exports_dir)
    if member.path is not None and not member.path.is_dir():
        raise MergerError(f"member {member.name!r}: path {member.path} is not a directory")
    return resolve_path(member_reference(member), registry_root=registry_root)


def memoized_weights_digest(checkpoint: Path, memo_file: Path | None = None) -> str:
    """The registry's `weights_digest` of a checkpoint, remembered in `memo_file` per checkpoint."""
    if not weight_files(checkpoint):
        raise MergerError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {checkpoint}")
    checkpoint = checkpoint.resolve()
    memo: dict[str, dict] = {}
    if memo_file is not None and memo_file.is_file():
        memo = json.loads(memo_file.read_text())
    recorded = memo.get(str(checkpoint))
    remembered = remembered_digest(checkpoint, recorded if isinstance(recorded, dict) else None)
    if memo_file is not None and remembered != recorded:
        memo[str(checkpoint)] = remembered
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_file, json.dumps(memo).encode())
    return remembered["sha256"]


def run_member_checkpoint(member: Member, exports_dir: Path | None) -> Path:
    """A finished run's winner (RUN_DIR/final), or one of its baselines exported from its mergekit YAML."""
    assert member.run is not None
    layout = RunDir(member.run)
    summary = layout.read_summary()
    if summary is None:
        raise MergerError(f"member {member.name!r}: {member.run} is not a finished run (no summary.json)")
    if member.model_of_run == RUN_WINNER:
        if not layout.final.is_dir():
            raise MergerError(f"member {member.name!r}: the run's winner {layout.final} is missing")
        return layout.final
    name = (
        best_baseline(summary, member)
        if member.model_of_run == RUN_BEST_BASELINE
        else member.model_of_run.removeprefix(RUN_BASELINE_PREFIX)
    )
    config_file = layout.baseline_config(name)
    if not config_file.is_file():
        known = ", ".join(sorted(summary.baselines)) or "none"
        raise MergerError(f"member {member.name!r}: the run has no baseline {name!r} (it has {known})")
    if exports_dir is None:
        raise MergerError(
            f"member {member.name!r}: a run's baseline needs the pool's work_dir to export into"
        )
    return export_baseline(config_file, exports_dir / f"{member.name}-{name}", summary.seed)


def best_baseline(summary: Summary, member: Member) -> str:
    """The baseline with the best mean validation score (the split that selects, never the test)."""
    scored = {name: baseline.cell("validation", "(mean)") for name, baseline in summary.baselines.items()}
    for name, baseline in summary.baselines.items():
        validation = baseline.by_split().get("validation")
        if scored[name] is None and validation:
            scored[name] = sum(validation.values()) / len(validation)
    ranked = {name: score for name, score in scored.items() if score is not None}
    if not ranked:
        raise MergerError(f"member {member.name!r}: the run has no baseline with validation scores")
    return max(ranked, key=lambda name: ranked[name])


def export_baseline(config_file: Path, target: Path, seed: int | None, trust_remote_code: bool = False) -> Path:
    """mergekit's export of a baseline's YAML into `target`, kept while the YAML beside it is unchanged."""
    from mergekit.config import MergeConfiguration

    from merger.engine.reference import export_merge

    text = config_file.read_text()
    recorded = target / config_file.name
    if target.is_dir() and recorded.is_file() and recorded.read_text() == text:
        return target
    config = MergeConfiguration.model_validate(read_yaml_file(config_file, "baseline configuration"))
    staging = staging_dir(target)
    shutil.rmtree(staging, ignore_errors=True)
    export_merge(config, staging, seed=seed, trust_remote_code=trust_remote_code)
    (staging / config_file.name).write_text(text)
    shutil.rmtree(target, ignore_errors=True)
    return publish_directory(staging, target)


def member_content_key(
    member: Member,
    memo_file: Path | None = None,
    registry_root: Path | None = None,
    exports_dir: Path | None = None,
) -> str:
    """Weights hash for local members; endpoint + model for remote ones (a remote may change unseen)."""
    if member.remote is not None:
        return (
            "remote:" + hashlib.sha256(f"{member.remote.base_url}|{member.remote.model}".encode()).hexdigest()
        )
    checkpoint = member_checkpoint(member, registry_root, exports_dir)
    return "weights:" + memoized_weights_digest(checkpoint, memo_file)
