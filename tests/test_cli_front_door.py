"""The CLI's front door: help texts and argument errors import no heavy library, and a command whose
optional extra is missing says in one line which extra to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from merger.common.extras import EXTRA_MODULES, MissingExtra, missing_modules, require_extra
from tests.cli import REPO, assert_one_line_error
from tests.recipes import tiny_recipe, write_recipe

HEAVY_MODULES = (
    "torch", "transformers", "mergekit", "lm_eval", "ray", "fastapi", "uvicorn", "matplotlib",
    "sentence_transformers",
)

# Every command path's `--help` and a few argument errors, in one fresh interpreter; prints what was
# shown and which heavy modules that imported.
FRONT_DOOR_SCRIPT = """
import argparse, contextlib, io, json, sys
from merger.cli import build_parser, main

def command_paths(parser, prefix):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from command_paths(subparser, [*prefix, name])

def exit_code(arguments):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            main(arguments)
        except SystemExit as stop:
            return stop.code, out.getvalue() + err.getvalue()
    raise AssertionError(f"{arguments} did not stop at the parser")

helped = {}
for path in command_paths(build_parser(), []):
    code, text = exit_code([*path, "--help"])
    helped[" ".join(path)] = [code, text.startswith("usage: merger")]
errors = {" ".join(arguments): exit_code(arguments)[0]
          for arguments in (["run"], ["no-such-command"], ["registry", "show"], ["serve", "--port", "x"])}
heavy = [name for name in sys.argv[1:] if name in sys.modules]
print(json.dumps({"helped": helped, "errors": errors, "heavy": heavy}))
"""

# `merger ARGS` in a process where the modules named first cannot be imported (as if not installed).
WITHOUT_MODULES = (
    "import runpy, sys; sys.modules.update(dict.fromkeys(sys.argv[1].split(',')));"
    " sys.argv = ['merger', *sys.argv[2:]]; runpy.run_module('merger.cli', run_name='__main__')"
)


def _environment() -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def merger_without(modules: list[str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_MODULES, ",".join(modules), *args],
        cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=300,
    )


def test_help_and_argument_errors_import_no_heavy_library() -> None:
    process = subprocess.run(
        [sys.executable, "-c", FRONT_DOOR_SCRIPT, *HEAVY_MODULES],
        cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    shown = json.loads(process.stdout.strip().splitlines()[-1])
    assert shown["heavy"] == []
    commands = shown["helped"]
    assert {"", "run", "status", "serve", "router train", "registry list", "report", "zoo build"} <= set(commands)
    assert all(code == 0 and usage for code, usage in commands.values()), commands
    assert set(shown["errors"].values()) == {2}, shown["errors"]


@pytest.mark.parametrize(
    ("blocked", "args", "command", "extra"),
    [
        (["uvicorn"], ["serve", "pool.yaml"], "merger serve", "router"),
        (["fastapi"], ["serve", "pool.yaml"], "merger serve", "router"),
        (["sentence_transformers"], ["router", "train", "pool.yaml"], "merger router train", "router"),
        (["openai"], ["router", "eval", "pool.yaml"], "merger router eval", "router"),
        (["matplotlib"], ["report", "runs/any"], "merger report", "report"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(
    blocked: list[str], args: list[str], command: str, extra: str
) -> None:
    process = merger_without(blocked, *args)
    line = assert_one_line_error(process, command, f"pip install 'merger[{extra}]'", *blocked)
    assert "Traceback" not in process.stderr, line


@pytest.mark.slow  # a `merger run` subprocess that loads models and lm-eval
def test_a_ray_recipe_without_ray_names_the_extra(
    tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "ray.yaml", tiny_recipe(tiny_sources, tiny_evals, run_dir, executor={"kind": "ray"})
    )
    process = merger_without(["ray"], "run", str(recipe), "--no-progress", cwd=tmp_path)
    assert_one_line_error(process, "executor: ray", "pip install 'merger[ray]'")
    assert not run_dir.exists()  # refused before the run directory is made


def test_require_extra_names_only_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.setitem(sys.modules, "openai", None)
    assert {"uvicorn", "openai"} <= set(missing_modules("router"))
    with pytest.raises(MissingExtra, match=r"merger serve needs the 'router' extra \(missing: .*uvicorn") as caught:
        require_extra("router", "merger serve")
    assert str(caught.value).endswith("install it with: pip install 'merger[router]'")
    assert "\n" not in str(caught.value)


def test_each_extra_is_declared_with_its_modules() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRA_MODULES.items():
        requirements = " ".join(declared[extra]).lower()
        for module in modules:
            assert module.replace("_", "-") in requirements, (extra, module)
