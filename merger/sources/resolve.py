"""Turning a recipe's source references into local checkpoint directories, and checking they merge.

A reference is a local directory, `registry:NAME[@VERSION]` (the local registry), `zoo:NAME` or
`zoo:skills/NAME` (the bundled real-model zoos, built on demand) or a Hugging Face id found in the
local HF cache only.
"""

from __future__ import annotations

from pathlib import Path

from merger.common.errors import MergerError
from merger.recipe.schema import Recipe

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads")


def resolve_path(reference: str, *, registry_root: Path | None = None) -> Path:
    if reference.startswith("registry:"):
        from merger.registry import resolve_source

        return Path(resolve_source(reference, registry_root))
    if reference.startswith("zoo:"):
        from merger.zoo.build import zoo_checkpoint

        return zoo_checkpoint(reference)  # an unknown name is refused before anything builds
    path = Path(reference)
    if path.exists():
        return path
    if reference.count("/") == 1 and not reference.startswith((".", "/")):
        return _from_hf_cache(reference)
    raise MergerError(f"source {reference!r} does not exist")


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise MergerError(
            f"source {repo_id!r} is neither a local directory nor in the local Hugging Face cache "
            "(merger never downloads; fetch it first or give a path)"
        ) from None


def check_weights(name: str, path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        raise MergerError(f"source {name}: {path} is a file, not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise MergerError(f"source {name}: {path} has no config.json (not a Hugging Face checkpoint)")
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")):
        if allow_pickle:
            return
        raise MergerError(
            f"source {name}: {path} only has pickled .bin weights; set allow_pickle: true to load them"
        )
    raise MergerError(f"source {name}: {path} has no safetensors weights")


def resolve_sources(recipe: Recipe) -> dict[str, Path]:
    """Local directories for every source, after checking they hold mergeable weights."""
    registry_root = Path(recipe.output.registry) if recipe.output.registry else None
    paths = {}
    for source in recipe.sources:
        path = resolve_path(source.path, registry_root=registry_root)
        check_weights(source.name, path, recipe.allow_pickle)
        paths[source.name] = path.resolve()
    check_compatible(paths, recipe.trust_remote_code)
    return paths


def check_compatible(paths: dict[str, Path], trust_remote_code: bool) -> int:
    """All sources share architecture and shapes; returns their number of layers."""
    from transformers import AutoConfig

    configs = {}
    for name, path in paths.items():
        try:
            configs[name] = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as error:
            raise MergerError(f"source {name}: cannot read {path}/config.json: {error}") from None
    first_name, first = next(iter(configs.items()))
    for name, config in configs.items():
        if config.architectures != first.architectures:
            raise MergerError(
                f"sources {first_name} and {name} cannot be merged: architectures "
                f"{first.architectures} and {config.architectures} differ"
            )
        for field in SHAPE_FIELDS:
            if getattr(config, field, None) != getattr(first, field, None):
                raise MergerError(
                    f"sources {first_name} and {name} cannot be merged: {field} is "
                    f"{getattr(first, field, None)} vs {getattr(config, field, None)}"
                )
    return int(first.num_hidden_layers)
