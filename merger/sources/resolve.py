"""Turning source references into local checkpoint directories, and checking they merge.

The one resolver of the tree: a recipe's sources, a pool member's checkpoint and the zoo's models
all go through `resolve_path`. The reference syntax is `merger.common.references`.
A `zoo:` reference names the base (`zoo:base`) or a specialist of a bundled zoo (`zoo:add`,
`zoo:skills/sort`); it is built on first use.
"""

from __future__ import annotations

from pathlib import Path

from merger.common.errors import MergerError
from merger.common.references import ZOO_PREFIX, could_be_hub_id, is_registry_reference
from merger.recipe import Recipe

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads")


def resolve_path(reference: str, *, registry_root: Path | None = None) -> Path:
    """The local directory of `registry:NAME[@VERSION]` (verified), `zoo:NAME`, a path or a cached hub id."""
    if is_registry_reference(reference):
        from merger.registry import Registry

        return Registry(registry_root).resolve(reference)
    if reference.startswith(ZOO_PREFIX):
        from merger.zoo.build import zoo_checkpoint

        return zoo_checkpoint(reference)  # an unknown name is refused before anything builds
    path = Path(reference)
    if path.exists():
        return path
    if could_be_hub_id(reference):
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


def registry_root(recipe: Recipe) -> Path | None:
    return Path(recipe.output.registry) if recipe.output.registry else None


def resolve_sources(recipe: Recipe) -> dict[str, Path]:
    """Local directories for every source (`resolve_checked`'s checks)."""
    return resolve_checked(recipe)[0]


def resolve_checked(recipe: Recipe) -> tuple[dict[str, Path], int]:
    """Local directories for every source and their number of layers, after checking they hold mergeable
    weights of one architecture and that the merged model's tokenizer can do what the eval sets ask of
    it (before any weights are loaded)."""
    paths = {}
    for source in recipe.sources:
        path = resolve_path(source.path, registry_root=registry_root(recipe))
        check_weights(source.name, path, recipe.allow_pickle)
        paths[source.name] = path.resolve()
    num_layers = check_compatible(paths, recipe.trust_remote_code)
    check_chat_template(recipe, paths)
    return paths, num_layers


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


def check_chat_template(recipe: Recipe, paths: dict[str, Path]) -> None:
    """Refuse eval sets with `apply_chat_template: true` when the merged tokenizer has no chat template
    (lm-eval would fail on every candidate)."""
    eval_sets = {"fitness": recipe.fitness, "validation": recipe.validation, "test": recipe.test}
    wanting = [name for name, eval_set in eval_sets.items() if eval_set and eval_set.apply_chat_template]
    if not wanting:
        return
    source = recipe.tokenizer_name
    if _chat_template(paths[source], recipe.trust_remote_code):
        return
    raise MergerError(
        f"{wanting[0]}.apply_chat_template is true, but the tokenizer of source {source} "
        f"({paths[source]}) has no chat template: set {wanting[0]}.apply_chat_template: false "
        "or take the tokenizer from a source that has one (tokenizer_source)"
    )


def _chat_template(path: Path, trust_remote_code: bool) -> str | dict | None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise MergerError(f"cannot read the tokenizer in {path}: {error}") from None
    return tokenizer.chat_template
