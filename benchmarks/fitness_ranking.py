"""Which fitness ranks candidates closest to their held-out ranking: generated exact_match, or the
teacher-forced twin's gold_prob, greedy match (acc) or their blend, on the same fitness items?

Candidates are those of a finished run directory (--run-dir, its ledger's evaluations over all
generations), or of a short search this script runs first (--recipe, into --out, reused when present);
--candidates N takes N of them evenly spread over the run's order (generations), never by score. Each
is merged once by the project's own worker (fp32, as the recipe's run scored it) and scored:

    exact_match  the recipe's fitness tasks, generated (what the run's fitness was)
    gold_prob    the same items' `*_tf` twins: the probability of the gold answer + terminator
    acc          the twins' greedy match, from the same forward pass
    blend        the mean of acc and gold_prob
    held-out     the recipe's test tasks, generated, weighted as the recipe weights them

Printed: the Spearman rank correlation of each fitness with held-out accuracy over the candidates, with a
bootstrap 95% interval over candidates and the paired interval of its difference from exact_match's;
per-item agreement of the greedy match with generated exact_match (count, and examples of the items
where they differ, with a reason); seconds per item for generated and teacher-forced scoring; and the
load it ran under. The last line is JSON: {"recipe", "run_dir", "candidates", "fitness_items",
"held_out_items", "spearman": {FITNESS: {"rho", "low", "high", "minus_exact_match": [low, high]}},
"agreement", "seconds_per_item", "loadavg", ...}.

Usage:
    python benchmarks/fitness_ranking.py --run-dir /work/det/after --candidates 16
    python benchmarks/fitness_ranking.py --recipe recipes/quickstart.yaml      # runs the search first
    python benchmarks/fitness_ranking.py --tiny                                 # tiny models: self-check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.scoring_precision import open_worker, spearman  # noqa: E402
from merger.recipe import EvalSet, Recipe, TaskSpec, load_recipe, parse_recipe  # noqa: E402
from merger.rundir.layout import RunDir  # noqa: E402
from merger.rundir.ledger import Ledger  # noqa: E402
from merger.scoring.fitness import ItemScores, TaskSuite, fitness_score, task_paths, weighted_score  # noqa: E402
from merger.scoring.lm_eval_bridge import quiet_lm  # noqa: E402
from merger.scoring.results import scored_samples, task_score  # noqa: E402
from merger.zoo.data import TEACHER_FORCED_SUFFIX  # noqa: E402

FITNESSES = ("exact_match", "gold_prob", "acc", "blend")
REFERENCE = "exact_match"
EXAMPLES = 8  # disagreeing items shown


@dataclass(frozen=True)
class Correlation:
    """A fitness's Spearman correlation with held-out accuracy, its bootstrap interval over candidates,
    and the paired interval of (its correlation - the reference fitness's)."""

    rho: float
    low: float
    high: float
    minus_reference: tuple[float, float]


@dataclass
class Scored:
    """One eval set's metric on one candidate: task scores, each item's value, the logged samples."""

    scores: dict[str, float]
    items: ItemScores
    samples: dict[str, dict[int, dict[str, Any]]]


@dataclass
class CandidateScores:
    """One candidate's fitness items, generated and teacher-forced (one pass gives gold_prob and acc)."""

    exact_match: Scored
    gold_prob: Scored
    acc: Scored
    generated_seconds: float
    teacher_forced_seconds: float

    def fitness(self, recipe: Recipe) -> dict[str, float]:
        """The candidate's fitness under each metric, aggregated over tasks as the recipe says."""
        values = {name: fitness_score(getattr(self, name).scores, recipe.fitness) for name in FITNESSES[:3]}
        values["blend"] = (values["acc"] + values["gold_prob"]) / 2
        return values


@dataclass
class Table:
    """Every candidate's fitness under each metric and its held-out score."""

    candidates: list[str] = field(default_factory=list)
    fitness: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in FITNESSES})
    held_out: list[float] = field(default_factory=list)
    scored: list[CandidateScores] = field(default_factory=list)
    held_out_seconds: float = 0.0
    merge_seconds: float = 0.0

    def add(self, key: str, scored: CandidateScores, fitness: dict[str, float], held_out: float) -> None:
        self.candidates.append(key)
        self.scored.append(scored)
        for name in FITNESSES:
            self.fitness[name].append(fitness[name])
        self.held_out.append(held_out)


def twin_set(fitness: EvalSet) -> EvalSet:
    """The fitness set on its tasks' teacher-forced twins: the same items, read as gold_prob."""
    tasks = [
        TaskSpec(name=task.name + TEACHER_FORCED_SUFFIX, metric="gold_prob", weight=task.weight)
        for task in fitness.tasks
    ]
    kept = ("limit", "subsample_seed", "num_fewshot", "apply_chat_template", "batch_size")
    return EvalSet(tasks=tasks, **{name: getattr(fitness, name) for name in kept})


def read_set(
    output: Mapping[str, Any], tasks: Sequence[TaskSpec], metric: str | None, suffix: str = ""
) -> Scored:
    """Task scores and item values of `output` under `metric` (each task's own when None), keyed by the
    task names in `tasks` (lm-eval's are those plus `suffix`)."""
    scores, items, samples = {}, {}, {}
    for task in tasks:
        name, chosen = task.name + suffix, metric or task.metric
        scores[task.name] = task_score(output, name, chosen)
        logged = scored_samples(output, name, chosen)
        items[task.name] = {int(sample["doc_id"]): value for sample, value in logged}
        samples[task.name] = {int(sample["doc_id"]): sample for sample, _ in logged}
    return Scored(scores, items, samples)


def timed_run(suite: TaskSuite, lm: Any) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    output = suite.run(lm, log_samples=True)
    return output, time.perf_counter() - started


def score_fitness(recipe: Recipe, generated: TaskSuite, twins: TaskSuite, lm: Any) -> CandidateScores:
    """The resident candidate's fitness items, generated, then teacher-forced."""
    tasks = recipe.fitness.tasks
    output, generated_seconds = timed_run(generated, lm)
    exact_match = read_set(output, tasks, None)
    output, forced_seconds = timed_run(twins, lm)
    gold_prob = read_set(output, tasks, "gold_prob", TEACHER_FORCED_SUFFIX)
    acc = read_set(output, tasks, "acc", TEACHER_FORCED_SUFFIX)
    return CandidateScores(exact_match, gold_prob, acc, generated_seconds, forced_seconds)


def score_candidates(recipe: Recipe, genotypes: dict[str, list[float]]) -> Table:
    """Merge each candidate once and score it on fitness (generated and teacher-forced) and held-out."""
    assert recipe.test is not None, "held-out accuracy needs the recipe's test tasks"
    worker = open_worker(recipe)
    generated = worker.scorer.suites["fitness"]
    twins = TaskSuite(twin_set(recipe.fitness), task_paths(recipe))
    lm = quiet_lm(worker.scoring.model, worker.tokenizer, recipe.fitness.batch_size)
    table = Table()
    for key, genotype in genotypes.items():
        started = time.perf_counter()
        worker.merge(np.asarray(genotype))
        worker.scoring.refresh()
        table.merge_seconds += time.perf_counter() - started
        scored = score_fitness(recipe, generated, twins, lm)
        started = time.perf_counter()
        held_out = weighted_score(worker.scorer.score("test"), recipe.test)
        table.held_out_seconds += time.perf_counter() - started
        fitness = scored.fitness(recipe)
        table.add(key, scored, fitness, held_out)
        shown = "  ".join(f"{name} {fitness[name]:.3f}" for name in FITNESSES)
        print(f"  {key:>8}: {shown}  held-out {held_out:.3f}", flush=True)
    return table


def rank_agreement(
    fitness: Mapping[str, Sequence[float]],
    held_out: Sequence[float],
    reference: str = REFERENCE,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Correlation]:
    """Each fitness's Spearman correlation with `held_out` over candidates, with percentile bootstrap 95%
    intervals (candidates resampled with replacement, the same resamples for every fitness, so the
    difference from `reference` is paired). Resamples whose ranks are undefined (all tied) are skipped."""
    count = len(held_out)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, count, size=(resamples, count))
    columns = {name: np.asarray(values, dtype=float) for name, values in fitness.items()}
    truth = np.asarray(held_out, dtype=float)
    boot = {
        name: np.array([_rho(values[draw], truth[draw]) for draw in draws])
        for name, values in columns.items()
    }
    result = {}
    for name, values in columns.items():
        differences = boot[name] - boot[reference]
        result[name] = Correlation(
            rho=_rho(values, truth),
            low=_percentile(boot[name], 2.5),
            high=_percentile(boot[name], 97.5),
            minus_reference=(_percentile(differences, 2.5), _percentile(differences, 97.5)),
        )
    return result


def _rho(first: np.ndarray, second: np.ndarray) -> float:
    if len(set(first.tolist())) < 2 or len(set(second.tolist())) < 2:
        return math.nan  # no ranking to compare
    return spearman(first.tolist(), second.tolist())


def _percentile(values: np.ndarray, q: float) -> float:
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, q)) if finite.size else math.nan


@dataclass
class Disagreement:
    candidate: str
    task: str
    doc: int
    exact_match: float
    greedy: float
    continuation: str  # the twin's gold answer + terminator, which the greedy match needs token for token
    generated: str
    reason: str


def disagreements(table: Table) -> tuple[int, list[Disagreement]]:
    """Items (over every candidate) scored, and those where the greedy match and exact_match differ."""
    total, found = 0, []
    for key, scored in zip(table.candidates, table.scored, strict=True):
        for task, values in scored.exact_match.items.items():
            for doc, value in values.items():
                total += 1
                greedy = scored.acc.items[task][doc]
                if value != greedy:
                    continuation = str(scored.acc.samples[task][doc].get("target", ""))
                    generated = _generated_text(scored.exact_match.samples[task][doc])
                    reason = why_they_differ(continuation, generated, value, greedy)
                    found.append(Disagreement(key, task, doc, value, greedy, continuation, generated, reason))
    return total, found


def _generated_text(sample: Mapping[str, Any]) -> str:
    response: Any = sample.get("filtered_resps", sample.get("resps", ""))
    while isinstance(response, list | tuple) and response:
        response = response[0]
    return str(response)


def why_they_differ(continuation: str, generated: str, exact_match: float, greedy: float) -> str:
    """Why generated exact_match and the greedy match of the gold `continuation` (answer + newline)
    disagree on one item; generation stops before the newline, so the same text is `generated + "\n"`."""
    if exact_match > greedy:
        if generated + "\n" == continuation:
            return "same text, other tokens at the boundary (tokenisation)"
        if generated.strip() == continuation.strip():
            return "surrounding spaces or another terminator, which exact_match forgives"
        return "case or punctuation, which exact_match normalises"
    return "the gold tokens are greedy, but generation (batched, padded) produced other text"


def spread(keys: list[str], count: int | None) -> list[str]:
    """`count` keys evenly spaced over `keys` (all when count is None or not smaller)."""
    if count is None or count >= len(keys):
        return keys
    picks = np.linspace(0, len(keys) - 1, count).round().astype(int)
    return [keys[i] for i in sorted(set(picks.tolist()))]


def ledger_candidates(run_dir: Path, count: int | None) -> dict[str, list[float]]:
    """The run's successful search candidates (genotypes), `count` of them spread over its order."""
    ledger = Ledger(run_dir)
    try:
        records = {r.candidate: r.genotype for r in ledger.evaluations() if not r.failed}
    finally:
        ledger.close()
    return {key: records[key] for key in spread(list(records), count)}


def run_search(recipe: Recipe, run_dir: Path) -> None:
    """The recipe's search into `run_dir` (resumed, or nothing to do, when it is there already)."""
    from merger.search.loop import Search
    from merger.search.open import open_run

    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"run_dir": str(run_dir)})})
    with open_run(recipe, run_dir) as run:
        Search(run).run()


def with_limits(recipe: Recipe, fitness_limit: int | None, test_limit: int | None) -> Recipe:
    """The recipe with smaller fitness / test limits where asked (the same items for every metric)."""
    updates = {}
    if fitness_limit is not None:
        updates["fitness"] = recipe.fitness.model_copy(update={"limit": fitness_limit})
    if test_limit is not None and recipe.test is not None:
        updates["test"] = recipe.test.model_copy(update={"limit": test_limit})
    return recipe.model_copy(update=updates)


def measure(recipe: Recipe, run_dir: Path, count: int | None) -> dict[str, Any]:
    genotypes = ledger_candidates(run_dir, count)
    load_before, started = load_average(), time.perf_counter()
    table = score_candidates(recipe, genotypes)
    result = summarize(recipe, run_dir, table, time.perf_counter() - started)
    return {**result, "loadavg_before": load_before}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(load, 2) for load in os.getloadavg()]


def item_count(scored: Sequence[CandidateScores]) -> int:
    """Fitness items scored, over every candidate."""
    return sum(len(values) for one in scored for values in one.exact_match.items.values())


def summarize(recipe: Recipe, run_dir: Path, table: Table, seconds: float) -> dict[str, Any]:
    correlations = rank_agreement(table.fitness, table.held_out)
    total, differ = disagreements(table)
    fitness_items = item_count(table.scored)
    candidates = len(table.candidates)
    held_out_items = _held_out_items(recipe) * candidates
    return {
        "run_dir": str(run_dir),
        "candidates": candidates,
        "fitness_items": fitness_items // max(1, candidates),
        "held_out_items": held_out_items // max(1, candidates),
        "spearman": {
            name: {
                "rho": _round(c.rho),
                "low": _round(c.low),
                "high": _round(c.high),
                "minus_exact_match": [_round(v) for v in c.minus_reference],
            }
            for name, c in correlations.items()
        },
        "agreement": {
            "items": total,
            "differ": len(differ),
            "share": _round(1 - len(differ) / max(1, total)),
        },
        "examples": [vars(d) for d in differ[:EXAMPLES]],
        "reasons": _count_reasons(differ),
        "seconds_per_item": {
            "generated": _round(sum(s.generated_seconds for s in table.scored) / max(1, fitness_items)),
            "teacher_forced": _round(
                sum(s.teacher_forced_seconds for s in table.scored) / max(1, fitness_items)
            ),
            "held_out_generated": _round(table.held_out_seconds / max(1, held_out_items)),
        },
        "merge_seconds_per_candidate": _round(table.merge_seconds / max(1, candidates)),
        "seconds": round(seconds, 1),
        "fitness": {name: [_round(v) for v in values] for name, values in table.fitness.items()},
        "held_out": [_round(v) for v in table.held_out],
        "loadavg": load_average(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _held_out_items(recipe: Recipe) -> int:
    assert recipe.test is not None
    suite = TaskSuite(recipe.test, task_paths(recipe))
    return sum(len(ids) for ids in suite.item_ids().values())


def _count_reasons(differ: list[Disagreement]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in differ:
        counts[item.reason] = counts.get(item.reason, 0) + 1
    return counts


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def report(result: dict[str, Any]) -> str:
    lines = [
        f"recipe: {result['recipe']}  run: {result['run_dir']}  candidates: {result['candidates']}  "
        f"fitness items: {result['fitness_items']}  held-out items: {result['held_out_items']}",
        f"{'fitness':<12} {'Spearman':>9} {'95% interval':>18} {'minus exact_match':>20}",
    ]
    for name, c in result["spearman"].items():
        difference = (
            "-" if name == REFERENCE else f"[{c['minus_exact_match'][0]}, {c['minus_exact_match'][1]}]"
        )
        interval = f"[{c['low']}, {c['high']}]"
        lines.append(f"{name:<12} {c['rho']!s:>9} {interval:>18} {difference:>20}")
    agreement = result["agreement"]
    lines.append(
        f"greedy match vs generated exact_match: {agreement['items'] - agreement['differ']} of "
        f"{agreement['items']} items agree ({agreement['differ']} differ)"
    )
    for reason, count in result["reasons"].items():
        lines.append(f"  {count:>4} x {reason}")
    for d in result["examples"]:
        lines.append(
            f"  {d['candidate']} {d['task']}#{d['doc']}: exact_match {d['exact_match']:.0f} greedy "
            f"{d['greedy']:.0f}  gold {d['continuation']!r}  generated {d['generated']!r}"
        )
    cost = result["seconds_per_item"]
    lines += [
        f"seconds per item: generated {cost['generated']}  teacher-forced {cost['teacher_forced']} (gold_prob, "
        f"acc and blend from one pass)  held-out generated {cost['held_out_generated']}; merge "
        f"{result['merge_seconds_per_candidate']} s per candidate; {result['seconds']} s in all",
        f"load average (1/5/15 min) {result.get('loadavg_before')} before, {result['loadavg']} after, on "
        f"{os.cpu_count()} CPUs  OMP_NUM_THREADS={result['omp_num_threads']}",
        json.dumps(result),
    ]
    return "\n".join(lines)


def tiny_setup(root: Path) -> Recipe:
    """Tiny random models and a generated task with its teacher-forced twin: the mechanics only. Run it
    from `root` (the tasks name their data relative to the folder above evals/)."""
    from merger.zoo import data
    from tests.recipes import tiny_recipe
    from tests.test_teacher_forced import sum_rows, tiny_yaml
    from tests.tiny_models import build_sources

    data.write_eval_data(
        root / "evals", "tiny_tf", {"sum_val": sum_rows()}, "tiny_", tiny_yaml, data.teacher_forced_yaml
    )
    task = {"tasks": [{"name": "tiny_sum_val", "metric": "exact_match"}], "batch_size": 4}
    raw = tiny_recipe(
        build_sources(root / "sources"),
        root / "evals" / "tiny_tf",
        root / "run",
        fitness=task,
        validation=task,
        test=task,
        optimizer={"popsize": 3, "max_evaluations": 6},
        selection={"enabled": False},  # one tiny task serves every set: nothing unseen to select on
        baselines=[],
    )
    return parse_recipe(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished run directory (its recipe.yaml and ledger)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "fitness_ranking", help="where a search runs"
    )
    parser.add_argument("--candidates", type=int, help="this many, spread over the run (default: all)")
    parser.add_argument("--fitness-limit", type=int, help="fewer fitness items per task than the recipe's")
    parser.add_argument("--test-limit", type=int, help="fewer held-out items per task than the recipe's")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a quick self-check")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch if args.tiny else "."):
        if args.tiny:
            recipe, run_dir, name = tiny_setup(Path(scratch)), Path(scratch) / "run", "tiny"
        elif args.run_dir is not None:
            run_dir = args.run_dir
            recipe, name = load_recipe(RunDir(run_dir).recipe), str(run_dir / "recipe.yaml")
        else:
            recipe, name = load_recipe(args.recipe), str(args.recipe)
            run_dir = args.out / args.recipe.stem
        if args.tiny or args.run_dir is None:
            run_search(recipe, run_dir)
        result = measure(with_limits(recipe, args.fitness_limit, args.test_limit), run_dir, args.candidates)
    result["recipe"] = name
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
