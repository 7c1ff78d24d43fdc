"""engine.scoring_precision: candidates score in a bf16 copy while the merge, its digest and its export
stay in engine.dtype; `auto` follows the hardware; bad values are refused in one line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from merger.cli import main
from merger.common.errors import MergerError
from merger.executors import ScoreJob
from merger.executors.worker import CandidateWorker
from merger.recipe import parse_recipe
from merger.rundir.ledger import Ledger
from merger.scoring.precision import CPU_BF16_FLAGS, has_native_bf16, resolve_precision
from merger.search.records import candidate_record
from merger.sources.resolve import check_compatible, resolve_sources
from merger.space import make_genome
from tests.recipes import tiny_recipe, write_recipe

REPO = Path(__file__).resolve().parent.parent


def precision_recipe(sources: dict[str, Path], evals: Path, run_dir: Path, precision: str) -> dict[str, Any]:
    return tiny_recipe(
        sources, evals, run_dir,
        engine={"scoring_precision": precision},
        optimizer={"popsize": 2, "max_evaluations": 4, "seed": 3},
        baselines=["linear"],
    )


def worker_for(data: dict[str, Any]) -> CandidateWorker:
    recipe = parse_recipe(data)
    paths = resolve_sources(recipe)
    return CandidateWorker(recipe, paths, make_genome(recipe, paths, check_compatible(paths, False)))


def test_bf16_scores_a_copy_of_each_merge_and_records_the_merged_digest(tiny_sources, tiny_evals, tmp_path):
    bf16 = worker_for(precision_recipe(tiny_sources, tiny_evals, tmp_path / "run", "bf16"))
    fp32 = worker_for(precision_recipe(tiny_sources, tiny_evals, tmp_path / "run", "fp32"))
    assert fp32.scoring.model is fp32.model
    assert bf16.scoring.model is not bf16.model
    assert next(bf16.model.parameters()).dtype == torch.float32
    rng = np.random.default_rng(0)
    for generation in range(2):  # the copy follows every merge, not only the first
        genotype = rng.uniform(0.2, 0.9, bf16.space.dimension)
        record = candidate_record(generation, 0, genotype, bf16.score(ScoreJob("0/0", genotype)), bf16.recipe.fitness)
        assert record.failure is None and 0.0 <= record.score <= 1.0
        fp32.merge(genotype)
        assert record.digest == fp32.engine.digest()
        scored = dict(bf16.scoring.model.named_parameters())
        for name, merged in fp32.model.named_parameters():
            assert scored[name].dtype == torch.bfloat16
            assert torch.equal(scored[name], merged.to(torch.bfloat16)), name


@pytest.mark.slow  # a whole run
@pytest.mark.skipif(not has_native_bf16("cpu"), reason="bf16 asked for by name needs native bf16 units")
def test_a_bf16_run_records_its_precision_and_the_merged_digests(tiny_sources, tiny_evals, tmp_path, capsys):
    run_dir = tmp_path / "run"
    data = precision_recipe(tiny_sources, tiny_evals, run_dir, "bf16")
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "fitness:tiny_mc" in line)
    assert header.startswith("model (scored in bf16)")
    assert json.loads((run_dir / "summary.json").read_text())["scoring_precision"] == "bf16"
    ledger = Ledger(run_dir)
    assert ledger.meta().scoring_precision == "bf16"
    fp32 = worker_for(precision_recipe(tiny_sources, tiny_evals, tmp_path / "other", "fp32"))
    records = ledger.evaluations()
    assert len(records) == 4
    for record in records:
        fp32.merge(np.asarray(record.genotype))
        assert record.digest == fp32.engine.digest()


def write_cpuinfo(path: Path, flags: list[str]) -> Path:
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {' '.join(flags)}\n\n")
    return path


@pytest.mark.parametrize("flag", CPU_BF16_FLAGS)
def test_auto_picks_bf16_where_the_cpu_has_bf16_units(tmp_path, flag):
    assert resolve_precision("auto", "cpu", write_cpuinfo(tmp_path / "cpuinfo", [flag])) == "bf16"


def test_auto_stays_fp32_without_bf16_units(tmp_path):
    assert resolve_precision("auto", "cpu", write_cpuinfo(tmp_path / "cpuinfo", ["avx512f"])) == "fp32"
    assert resolve_precision("auto", "cpu", tmp_path / "no-cpuinfo") == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"
    assert resolve_precision("bf16", "cpu", tmp_path / "no-cpuinfo") == "bf16"  # asked for, not guessed
    cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    assert resolve_precision("auto", "cuda") == ("bf16" if cuda else "fp32")


def test_auto_on_this_machine_follows_its_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert has_native_bf16("cpu") == any(flag in flags.split() for flag in CPU_BF16_FLAGS)


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ({"scoring_precision": "fp16"}, "engine.scoring_precision: Input should be 'fp32', 'bf16' or 'auto'"),
        ({"scoring_precision": "fp32", "dtype": "bfloat16"}, "scoring_precision fp32 scores the merge as built"),
    ],
)
def test_bad_precisions_are_refused_in_one_line(tiny_sources, tiny_evals, tmp_path, capsys, engine, expected):
    data = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", engine=engine)
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bf16_asked_for_without_native_units_is_one_line_that_says_what_auto_does(
    tiny_sources, tiny_evals, tmp_path, capsys, monkeypatch
):
    from merger.scoring import precision

    monkeypatch.setattr(precision, "CPUINFO", write_cpuinfo(tmp_path / "cpuinfo", ["avx512f"]))
    data = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", engine={"scoring_precision": "bf16", "device": "cpu"})
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no native bf16 matrix units" in err and "`auto` would score in fp32 here" in err
    assert not (tmp_path / "run").exists()


def test_a_layer_path_refuses_bf16_scoring(tiny_sources, tiny_evals, tmp_path):
    data = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", engine={"scoring_precision": "bf16"})
    data["genome"] = {"space": "layer_path"}
    with pytest.raises(MergerError, match="scoring_precision: bf16 is not available for genome.space layer_path"):
        parse_recipe(data)


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scoring_precision", REPO / "benchmarks" / "scoring_precision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_compares_both_precisions_on_one_generation(tiny_sources, tiny_evals, tmp_path):
    benchmark = load_benchmark()
    recipe = parse_recipe(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run"))
    result = benchmark.compare_precisions(recipe, 3)
    assert result["candidates"] == 3 and len(result["fitness"]["bf16"]) == 3
    assert result["items"] == 3 * 24  # every fitness item of every candidate, compared
    assert 0.0 <= result["agreement"] <= 1.0 and result["fp32_s"] > 0 and result["bf16_s"] > 0
    assert json.loads(benchmark.report(result).splitlines()[-1]) == result
    same = [{"tiny_mc": {0: 1.0, 1: 0.0}}]
    assert benchmark.item_agreement(same, same) == (1.0, 2)
    assert benchmark.item_agreement(same, [{"tiny_mc": {0: 1.0, 1: 1.0}}]) == (0.5, 2)
