"""The outcome table: per item of a task set, each member's correctness, latency and cost.

Rows come from lm-eval runs with `log_samples=True` (one per task, so latency is per task: the task's wall
time over its item count). Each member's rows are cached under the pool's work dir, keyed by the member's
content (weights hash, or endpoint for remote members) and the task set, so they are reused until either changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merger.errors import MergerError
from merger.router.pool import Member, Pool, TaskSet
from merger.router.sources import member_checkpoint, member_content_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberRow:
    item_id: str
    task: str
    prompt: str
    correct: float
    latency_s: float


@dataclass
class OutcomeTable:
    """Items × members. `cost` is None when no member has a `cost_per_call`."""

    item_ids: list[str]
    tasks: list[str]
    prompts: list[str]
    members: list[str]
    correct: np.ndarray
    latency: np.ndarray
    cost: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = (len(self.item_ids), len(self.members))
        for name in ("correct", "latency") + (("cost",) if self.cost is not None else ()):
            if getattr(self, name).shape != shape:
                raise MergerError(
                    f"outcome table: {name} has shape {getattr(self, name).shape}, expected {shape}"
                )

    def subset(self, rows: np.ndarray) -> OutcomeTable:
        return OutcomeTable(
            item_ids=[self.item_ids[i] for i in rows],
            tasks=[self.tasks[i] for i in rows],
            prompts=[self.prompts[i] for i in rows],
            members=list(self.members),
            correct=self.correct[rows],
            latency=self.latency[rows],
            cost=None if self.cost is None else self.cost[rows],
        )

    def split(self, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Train/held-out row indices, the same fraction from every task, fixed by `seed`."""
        rng = np.random.default_rng(seed)
        train, held_out = [], []
        for task in sorted(set(self.tasks)):
            rows = np.flatnonzero(np.array(self.tasks) == task)
            rows = rows[rng.permutation(len(rows))]
            cut = max(1, round(len(rows) * holdout_fraction)) if len(rows) > 1 else 0
            held_out.extend(rows[:cut])
            train.extend(rows[cut:])
        return np.array(sorted(train), dtype=int), np.array(sorted(held_out), dtype=int)


def task_set_key(tasks: TaskSet) -> str:
    """What about the task set changes outcomes: names, limit, and the task files' contents."""
    parts: dict[str, Any] = {"names": sorted(tasks.names), "limit": tasks.limit}
    if tasks.include_path is not None:
        root = tasks.include_path
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".jsonl", ".json")
        )
        parts["files"] = {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
        }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _prompt_of(sample: dict[str, Any]) -> str:
    first = sample["arguments"][0]
    context = first[0] if isinstance(first, list | tuple) else first
    if isinstance(context, list):  # chat-templated requests: a list of messages
        return "\n".join(str(message.get("content", "")) for message in context)
    return str(context)


def _correctness_of(sample: dict[str, Any]) -> float:
    metrics = sample.get("metrics") or []
    if not metrics or metrics[0] not in sample:
        raise MergerError(f"lm-eval sample of doc {sample.get('doc_id')} carries no per-sample metric")
    return float(sample[metrics[0]])


class _Evaluator:
    """One TaskManager per process (building it is the slow part); one lm per member."""

    def __init__(self, tasks: TaskSet, registry_root: Path | None = None) -> None:
        from lm_eval.tasks import TaskManager

        self.tasks = tasks
        self.registry_root = registry_root
        include = str(tasks.include_path) if tasks.include_path is not None else None
        self.task_manager = TaskManager(include_path=include, include_defaults=include is None)

    def _language_model(self, member: Member) -> tuple[Any, bool]:
        if member.remote is not None:
            from lm_eval.models.openai_completions import LocalChatCompletion

            key = os.environ.get(member.remote.api_key_env or "", "") if member.remote.api_key_env else ""
            lm = LocalChatCompletion(
                base_url=f"{member.remote.base_url}/chat/completions",
                model=member.remote.model,
                tokenized_requests=False,
                tokenizer_backend=None,
                header={"Authorization": f"Bearer {key}"} if key else None,
                max_retries=1,
            )
            return lm, True
        from lm_eval.models.huggingface import HFLM

        checkpoint = member_checkpoint(member, self.registry_root)
        return HFLM(
            pretrained=str(checkpoint), batch_size=self.tasks.batch_size, device=self.tasks.device
        ), False

    def rows(self, member: Member) -> list[MemberRow]:
        import lm_eval

        lm, chat = self._language_model(member)
        rows: list[MemberRow] = []
        for task in self.tasks.names:
            started = time.perf_counter()
            try:
                result = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[task],
                    task_manager=self.task_manager,
                    limit=self.tasks.limit,
                    log_samples=True,
                    apply_chat_template=chat,
                )
            except Exception as error:  # lm-eval raises bare exceptions for unknown tasks, bad data...
                raise MergerError(
                    f"lm-eval failed on task {task!r} for member {member.name!r}: {error}"
                ) from error
            elapsed = time.perf_counter() - started
            samples = result["samples"].get(task, [])
            if not samples:
                raise MergerError(f"lm-eval logged no samples for task {task!r} (member {member.name!r})")
            per_item = elapsed / max(1, len(samples))
            for sample in samples:
                rows.append(
                    MemberRow(
                        item_id=f"{task}:{sample['doc_id']}",
                        task=task,
                        prompt=_prompt_of(sample),
                        correct=_correctness_of(sample),
                        latency_s=per_item,
                    )
                )
        return rows


def _cache_file(pool: Pool, member: Member, task_key: str) -> Path:
    content = member_content_key(member, pool.work_dir / "weights-digests.json", pool.registry_root)
    key = hashlib.sha256(f"{content}|{task_key}".encode()).hexdigest()[:20]
    return pool.work_dir / "outcomes" / f"{member.name}-{key}.json"


def member_rows(
    pool: Pool, member: Member, evaluator: _Evaluator | None, task_key: str
) -> tuple[list[MemberRow], bool]:
    """(rows, came_from_cache)."""
    cache = _cache_file(pool, member, task_key)
    if cache.is_file():
        return [MemberRow(**row) for row in json.loads(cache.read_text())], True
    if evaluator is None:
        raise MergerError(f"no cached outcomes for member {member.name!r}")
    rows = evaluator.rows(member)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(".tmp")
    temporary.write_text(json.dumps([row.__dict__ for row in rows]))
    temporary.replace(cache)
    return rows, False


def build_outcome_table(pool: Pool, progress: Any = None) -> OutcomeTable:
    """Evaluate every member on the pool's task set (cached per member) and align rows by item."""
    if pool.tasks is None:
        raise MergerError("the pool has no `tasks:` section; the router needs a task set to learn from")
    task_key = task_set_key(pool.tasks)
    evaluator: _Evaluator | None = None
    per_member: dict[str, dict[str, MemberRow]] = {}
    for member in pool.members:
        cache = _cache_file(pool, member, task_key)
        if evaluator is None and not cache.is_file():
            evaluator = _Evaluator(pool.tasks, pool.registry_root)
        rows, cached = member_rows(pool, member, evaluator, task_key)
        if progress is not None:
            progress(f"{member.name}: {len(rows)} items ({'cached' if cached else 'evaluated'})")
        per_member[member.name] = {row.item_id: row for row in rows}
    return align(pool, per_member)


def align(pool: Pool, per_member: dict[str, dict[str, MemberRow]]) -> OutcomeTable:
    names = pool.names
    common = set.intersection(*(set(rows) for rows in per_member.values()))
    if not common:
        raise MergerError("the members' outcome rows share no items; check the task set")
    item_ids = sorted(common)
    reference = per_member[names[0]]
    correct = np.array(
        [[per_member[name][item].correct for name in names] for item in item_ids], dtype=np.float64
    )
    latency = np.array(
        [[per_member[name][item].latency_s for name in names] for item in item_ids], dtype=np.float64
    )
    cost = None
    if any(member.cost_per_call is not None for member in pool.members):
        per_call = np.array([member.cost_per_call or 0.0 for member in pool.members])
        cost = np.tile(per_call, (len(item_ids), 1))
    return OutcomeTable(
        item_ids=item_ids,
        tasks=[reference[item].task for item in item_ids],
        prompts=[reference[item].prompt for item in item_ids],
        members=names,
        correct=correct,
        latency=latency,
        cost=cost,
    )
