"""Source references: resolving them, their remembered weights digest, and the chat-template check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from merger.common.errors import MergerError
from merger.common.references import could_be_hub_id, has_scheme, is_registry_reference
from merger.recipe import parse_recipe
from merger.registry import weights_digest
from merger.sources.digest import remembered_digest
from merger.sources.resolve import resolve_path, resolve_sources
from tests.cli import assert_one_line_error, run_merger
from tests.recipes import tiny_recipe, write_recipe

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


def test_reference_syntax() -> None:
    assert is_registry_reference("registry:merged@2") and not is_registry_reference("zoo:base")
    assert has_scheme("zoo:base") and has_scheme("registry:merged") and not has_scheme("models/base")
    assert could_be_hub_id("HuggingFaceTB/SmolLM2-135M")
    assert not could_be_hub_id("./models") and not could_be_hub_id("/abs/path") and not could_be_hub_id("a/b/c")


def test_resolve_path_names_what_is_missing(tmp_path: Path, tiny_sources: dict[str, Path]) -> None:
    assert resolve_path(str(tiny_sources["base"])) == tiny_sources["base"]
    with pytest.raises(MergerError, match="does not exist"):
        resolve_path(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(MergerError, match="the zoo has base"):
        resolve_path("zoo:no-such-skill")
    with pytest.raises(MergerError, match="registry is empty"):
        resolve_path("registry:nothing", registry_root=tmp_path / "registry")


def test_remembered_digest_is_reused_until_a_weight_file_changes(
    tmp_path: Path, tiny_sources: dict[str, Path]
) -> None:
    checkpoint = tmp_path / "model"
    shutil.copytree(tiny_sources["specialist1"], checkpoint)
    computed: list[Path] = []

    def counting_digest(path: Path) -> str:
        computed.append(path)
        return weights_digest(path)

    first = remembered_digest(checkpoint, None, counting_digest)
    assert first["sha256"] == weights_digest(checkpoint) and len(computed) == 1
    again = remembered_digest(checkpoint, json.loads(json.dumps(first)), counting_digest)  # as stored
    assert again == first and len(computed) == 1

    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, a new modification time: hashed again
    changed = remembered_digest(checkpoint, first, counting_digest)
    assert len(computed) == 2 and changed["stamp"] != first["stamp"] and changed["sha256"] == first["sha256"]


@pytest.mark.slow  # subprocesses
def test_chat_template_without_one_is_refused_before_the_run(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path
) -> None:
    run_dir = tmp_path / "run"
    data = tiny_recipe(tiny_sources, tiny_evals, run_dir, fitness={"apply_chat_template": True})
    process = run_merger("run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress")
    assert_one_line_error(process, "fitness.apply_chat_template", "source base", "no chat template")
    assert not run_dir.exists()  # refused before the run directory, and before any weights were loaded


def test_chat_template_is_read_from_the_tokenizer_source(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path
) -> None:
    chatty = tmp_path / "chatty"
    shutil.copytree(tiny_sources["specialist2"], chatty)
    config_file = chatty / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATE}))
    sources = {**tiny_sources, "specialist2": chatty}
    asks = {"validation": {"tasks": ["tiny_gen"], "apply_chat_template": True}}

    with_template = parse_recipe(
        tiny_recipe(sources, tiny_evals, tmp_path / "run", tokenizer_source="specialist2", **asks)
    )
    assert resolve_sources(with_template)["specialist2"] == chatty.resolve()

    from_base = parse_recipe(tiny_recipe(sources, tiny_evals, tmp_path / "run", **asks))
    with pytest.raises(MergerError, match="validation.apply_chat_template is true, but the tokenizer of source base"):
        resolve_sources(from_base)
