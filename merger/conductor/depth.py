"""Plan–execute–verify against one call, on the same items, through the conductor's own route and workflow.

For a sample of the outcome table's items (per task, some from the head's training split and some from
its held-out split), each prompt is routed as a request would be, then answered twice: one call down the
ranking, and plan–execute–verify. An answer is right when its first line is the gold answer. The outcomes
are stored (merger.router.depth) and resumed item by item. The gate is then learned from the training
items (a head trained with depth role targets) and measured on the held-out ones, next to one call
always, the pipeline always, and the gate of the saved head (member agreement, unless it was trained after
a depth measurement; the report names which).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.conductor.backends import Generation
from merger.conductor.routing import Conductor, build_conductor
from merger.conductor.workflow import FOLLOW_PLAN_PROMPT, PLAN_PROMPT, REVISE_PROMPT, VERIFY_PROMPT, answer
from merger.router.depth import DepthOutcome, depth_role_targets, load_depth, save_depth
from merger.router.head import RouterHead, softmax
from merger.router.outcomes import OutcomeTable
from merger.router.pool import ROLES, Pool, Role
from merger.router.training import fit_head, load_head, prepare_for
from merger.scoring.lm_eval_bridge import load_tasks
from merger.scoring.uncertainty import paired_difference

Progress = Callable[[str], None]
REPORT_FILE = "depth_report.json"
SAMPLE_SEED = 0


def workflow_key(generation: Generation) -> str:
    """What the stored outcomes depend on besides the pool: the workflow's prompts and the generation."""
    text = json.dumps([PLAN_PROMPT, FOLLOW_PLAN_PROMPT, VERIFY_PROMPT, REVISE_PROMPT, generation.max_tokens, generation.stop])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def depth_generation(pool: Pool) -> Generation:
    """How every measured answer is generated: the server's token limit, one line."""
    return Generation(max_tokens=pool.server.max_tokens, stop=("\n",))


def gold_answers(pool: Pool, item_ids: list[str]) -> dict[str, str]:
    """Each item's gold answer text, from its lm-eval task (`task:doc_id` ids, as in the outcome table)."""
    assert pool.tasks is not None
    include = (str(pool.tasks.include_path),) if pool.tasks.include_path else ()
    loaded = load_tasks(pool.tasks.names, include)["tasks"]
    docs = {name: list(task.eval_docs) for name, task in loaded.items()}
    golds = {}
    for item_id in item_ids:
        task_name, doc_id = item_id.rsplit(":", 1)
        task = loaded[task_name]
        doc = docs[task_name][int(doc_id)]
        target = task.doc_to_target(doc)
        if isinstance(target, int):  # multiple choice: the index of the right choice
            target = task.doc_to_choice(doc)[target]
        golds[item_id] = str(target).strip()
    return golds


def is_right(text: str, gold: str) -> float:
    lines = text.strip().splitlines()
    return float(bool(lines) and lines[0].strip() == gold)


def sample_items(
    table: OutcomeTable, train_rows: np.ndarray, held_out_rows: np.ndarray, per_task: int
) -> list[tuple[int, str]]:
    """(row, split) pairs: up to `per_task` items of each task from each split, drawn with a fixed seed."""
    rng = np.random.default_rng(SAMPLE_SEED)
    tasks = np.array(table.tasks)
    chosen = []
    for split, rows in (("train", train_rows), ("held_out", held_out_rows)):
        for task in sorted(set(table.tasks)):
            of_task = rows[tasks[rows] == task]
            chosen.extend((int(row), split) for row in sorted(rng.permutation(of_task)[:per_task]))
    return chosen


async def measure_item(conductor: Conductor, prompt: str, gold: str, generation: Generation) -> dict[str, Any]:
    """One call and plan–execute–verify on the same routed prompt."""
    messages = [{"role": "user", "content": prompt}]
    route = await conductor.route(prompt)
    started = time.perf_counter()
    single = await answer(conductor, route, messages, generation, pev=False)
    single_s = time.perf_counter() - started
    deep_route = replace(route, role_probabilities={})  # not confident: the pipeline runs
    started = time.perf_counter()
    deep = await answer(conductor, deep_route, messages, generation, pev=True)
    return {
        "member": single.members[0],
        "single": is_right(single.text, gold),
        "pev": is_right(deep.text, gold),
        "single_s": single_s,
        "pev_s": time.perf_counter() - started,
        "pev_calls": len(deep.attempts),
    }


def measure_depth(pool: Pool, per_task: int, progress: Progress | None = None) -> dict[str, Any]:
    """Measure (or resume) the sampled items' depth outcomes, store them, and report the gate."""
    if pool.tasks is None:
        raise MergerError("router depth needs the pool's tasks: the items it measures come from them")
    head = load_head(pool)
    table, embeddings, train_rows, held_out_rows = prepare_for(pool, head, progress)
    generation = depth_generation(pool)
    key = workflow_key(generation)
    sample = sample_items(table, train_rows, held_out_rows, per_task)
    outcomes = load_depth(pool, key)
    todo = [(row, split) for row, split in sample if table.item_ids[row] not in outcomes]
    if todo:
        golds = gold_answers(pool, [table.item_ids[row] for row, _ in todo])
        asyncio.run(_measure(pool, table, todo, golds, generation, outcomes, key, progress))
    report = gate_report(pool, table, embeddings, head, train_rows, outcomes)
    write_atomic(pool.work_dir / REPORT_FILE, json.dumps(report, indent=2).encode())
    return report


async def _measure(
    pool: Pool,
    table: OutcomeTable,
    todo: list[tuple[int, str]],
    golds: dict[str, str],
    generation: Generation,
    outcomes: dict[str, DepthOutcome],
    key: str,
    progress: Progress | None,
) -> None:
    """Every item in one event loop (remote members' clients belong to the loop that opened them), each
    stored as soon as it is measured: a stopped measurement resumes at the next item."""
    conductor = build_conductor(pool)
    try:
        for done, (row, split) in enumerate(todo, start=1):
            item_id = table.item_ids[row]
            measured = await measure_item(conductor, table.prompts[row], golds[item_id], generation)
            outcomes[item_id] = DepthOutcome(item_id=item_id, task=table.tasks[row], split=split, **measured)
            save_depth(pool, key, outcomes)
            if progress is not None and (done % 10 == 0 or done == len(todo)):
                progress(f"workflow depth: {done} of {len(todo)} items measured")
    finally:
        for backend in conductor.backends.values():
            await backend.close()


def _confident(head: RouterHead, embeddings: np.ndarray, threshold: float) -> np.ndarray:
    roles = softmax(head.forward(embeddings)[1])
    return roles[:, ROLES.index(Role.WORKER)] >= threshold


def gate_report(
    pool: Pool,
    table: OutcomeTable,
    embeddings: np.ndarray,
    head: RouterHead,
    train_rows: np.ndarray,
    outcomes: dict[str, DepthOutcome],
) -> dict[str, Any]:
    """Per task on the held-out sampled items: one call, the pipeline, the learned gate and the gate of
    the saved `head`; accuracy, calls and seconds per answer. The learned gate's head is trained on the
    whole training split (routing as usual) with depth role targets on the training items measured."""
    train_ids = [table.item_ids[i] for i in train_rows]
    learned = fit_head(pool, table, embeddings, head.encoder_id, train_rows, depth_role_targets(train_ids, outcomes))
    held = [o for o in outcomes.values() if o.split == "held_out"]
    if not held:
        raise MergerError("no held-out item was measured; raise --per-task")
    row_of = {item_id: row for row, item_id in enumerate(table.item_ids)}
    held_embeddings = embeddings[[row_of[o.item_id] for o in held]]
    gates = {
        "learned": ~_confident(learned, held_embeddings, pool.router.confidence),
        "saved": ~_confident(head, held_embeddings, pool.router.confidence),
    }
    train = [o for o in outcomes.values() if o.split == "train"]
    report: dict[str, Any] = {
        "train_items": len(train),
        "train_pev_better": sum(o.pev > o.single for o in train),
        "train_pev_worse": sum(o.pev < o.single for o in train),
        "max_tokens": pool.server.max_tokens,
        "saved_gate_source": str(head.meta.get("gate", "member agreement")),
        "tasks": {},
    }
    for task in [*sorted({o.task for o in held}), "all"]:
        rows = [i for i, o in enumerate(held) if task in ("all", o.task)]
        report["tasks"][task] = _modes(held, rows, gates)
    single = _per_task(held, [o.single for o in held])
    report["pev_minus_single"] = paired_difference(_per_task(held, [o.pev for o in held]), single, _mean)
    for name, deep in gates.items():
        gated = [o.pev if go_deep else o.single for o, go_deep in zip(held, deep, strict=True)]
        report[f"{name}_gate_minus_single"] = paired_difference(_per_task(held, gated), single, _mean)
    return report


def _modes(held: list[DepthOutcome], rows: list[int], gates: dict[str, np.ndarray]) -> dict[str, Any]:
    def mode(deep: np.ndarray) -> dict[str, float]:
        picked = [(held[i].pev, held[i].pev_calls, held[i].pev_s) if deep[i] else (held[i].single, 1, held[i].single_s) for i in rows]
        right, calls, seconds = zip(*picked, strict=True)
        return {
            "accuracy": float(np.mean(right)), "calls": float(np.mean(calls)), "seconds": float(np.mean(seconds)),
            "deep_share": float(np.mean([deep[i] for i in rows])),
        }

    count = len(held)
    return {
        "items": len(rows),
        "single": mode(np.zeros(count, dtype=bool)),
        "plan_execute_verify": mode(np.ones(count, dtype=bool)),
        **{f"{name}_gate": mode(deep) for name, deep in gates.items()},
    }


def _per_task(held: list[DepthOutcome], values: list[float]) -> dict[str, dict[int, float]]:
    """`values` (one per held-out outcome) as task -> item -> value, for the paired bootstrap."""
    per_task: dict[str, dict[int, float]] = {}
    for index, (outcome, value) in enumerate(zip(held, values, strict=True)):
        per_task.setdefault(outcome.task, {})[index] = value
    return per_task


def _mean(task_means: Any) -> float:
    return float(np.mean(list(task_means.values())))


MODES = ("single", "plan_execute_verify", "learned_gate", "saved_gate")


def format_depth(report: dict[str, Any]) -> str:
    lines = [
        f"workflow depth on held-out items (answers up to {report['max_tokens']} tokens); "
        f"on {report['train_items']} training items the pipeline was better on {report['train_pev_better']} "
        f"and worse on {report['train_pev_worse']}",
        f"{'task':<24} {'items':>5}  " + "  ".join(f"{mode:>26}" for mode in MODES),
        f"{'':<24} {'':>5}  " + "  ".join(f"{'acc  calls  s/ans  deep':>26}" for _ in MODES),
    ]
    for task, row in report["tasks"].items():
        cells = [
            f"{row[m]['accuracy']:.3f} {row[m]['calls']:5.2f} {row[m]['seconds']:6.2f} {row[m]['deep_share']:5.2f}"
            for m in MODES
        ]
        lines.append(f"{task:<24} {row['items']:>5}  " + "  ".join(f"{cell:>26}" for cell in cells))
    lines.append(f"saved gate: the saved head's ({report['saved_gate_source']})")
    for name in ("pev_minus_single", "learned_gate_minus_single", "saved_gate_minus_single"):
        point, low, high = report[name]
        lines.append(f"{name.replace('_', ' ')}: {point:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap 95%)")
    return "\n".join(lines)
