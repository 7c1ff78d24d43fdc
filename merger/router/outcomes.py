"""The outcome table: per item of a task set, each member's correctness, latency and cost.

Rows come from lm-eval runs with `log_samples=True` (one per task, so latency is per task: the task's wall
time over its item count). Each member's rows on each task are cached under the pool's work dir, keyed by
the member's content (weights hash, or endpoint for remote members) and that task's files and limit, so they
are reused until either changes: adding a task to the set evaluates only the new task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.router.members import member_checkpoint, member_content_key
from merger.router.pool import Member, Pool, TaskSet
from merger.scoring.lm_eval_bridge import chat_completions_lm, evaluate_tasks, load_tasks, quiet_lm
from merger.scoring.results import scored_samples

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


TASK_FILE_SUFFIXES = (".yaml", ".yml", ".jsonl", ".json", ".csv", ".parquet", ".txt")
_TASK_LINE = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


def _files_of_task(name: str, files: list[Path], yaml_texts: dict[Path, str]) -> list[Path]:
    """The task's YAML and every file under the include path whose name it mentions, following mentioned
    YAML (`include:`) in turn; all the files when its YAML is not found or names no data file."""
    own = next((path for path, text in yaml_texts.items() if name in _TASK_LINE.findall(text)), None)
    if own is None:
        return files
    found, pending = [own], [own]
    while pending:
        text = yaml_texts[pending.pop()]
        for path in files:
            if path not in found and path.name in text:
                found.append(path)
                if path in yaml_texts:
                    pending.append(path)
    return found if any(path not in yaml_texts for path in found) else files


def task_keys(tasks: TaskSet) -> dict[str, str]:
    """Per task, what changes its outcomes: its name, the limit and the contents of its files, so that
    adding a task (or editing one) leaves the other tasks' cached rows valid."""
    if tasks.include_path is None:
        files: list[Path] = []
    else:
        files = sorted(
            p for p in tasks.include_path.rglob("*") if p.is_file() and p.suffix in TASK_FILE_SUFFIXES
        )
    yaml_texts = {p: p.read_text() for p in files if p.suffix in (".yaml", ".yml")}
    digests: dict[Path, str] = {}
    keys = {}
    for name in tasks.names:
        parts: dict[str, Any] = {"name": name, "limit": tasks.limit}
        if tasks.metric is not None:  # only when named: the keys of pools without one stay as they were
            parts["metric"] = tasks.metric
        if tasks.include_path is not None:
            own = _files_of_task(name, files, yaml_texts)
            for path in own:
                if path not in digests:
                    digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            parts["files"] = {p.relative_to(tasks.include_path).as_posix(): digests[p] for p in own}
        keys[name] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return keys


def _prompt_of(sample: dict[str, Any]) -> str:
    first = sample["arguments"][0]
    context = first[0] if isinstance(first, list | tuple) else first
    if isinstance(context, list):  # chat-templated requests: a list of messages
        return "\n".join(str(message.get("content", "")) for message in context)
    return str(context)


class _Evaluator:
    """One lm per member; the bridge keeps one TaskManager per process (building it is the slow part)."""

    def __init__(
        self, tasks: TaskSet, registry_root: Path | None = None, exports_dir: Path | None = None
    ) -> None:
        self.tasks = tasks
        self.registry_root = registry_root
        self.exports_dir = exports_dir
        self.include_paths = (str(tasks.include_path),) if tasks.include_path is not None else ()

    def _language_model(self, member: Member) -> tuple[Any, bool]:
        if member.remote is not None:
            key = os.environ.get(member.remote.api_key_env or "", "") if member.remote.api_key_env else ""
            return chat_completions_lm(member.remote.base_url, member.remote.model, key), True
        checkpoint = member_checkpoint(member, self.registry_root, self.exports_dir)
        return quiet_lm(str(checkpoint), batch_size=self.tasks.batch_size, device=self.tasks.device), False

    def rows(self, member: Member, tasks: list[str]) -> Iterator[tuple[str, list[MemberRow]]]:
        """(task, the member's rows on it) as each task finishes, one model load for all of them."""
        try:
            lm, chat = self._language_model(member)
        except MergerError:
            raise
        except Exception as error:  # transformers' own errors for a missing or broken tokenizer or config
            raise MergerError(
                f"member {member.name!r} cannot score task {tasks[0]!r}: its tokenizer or model does not load"
                f" ({one_line(error)})"
            ) from error
        for task in tasks:
            yield task, self._task_rows(lm, chat, member, task)

    def _task_rows(self, lm: Any, chat: bool, member: Member, task: str) -> list[MemberRow]:
        started = time.perf_counter()
        try:
            # loaded as configs with anchored data files: a task's relative data paths work from any directory
            loaded = load_tasks([task], self.include_paths)
        except Exception as error:  # lm-eval raises bare exceptions for unknown tasks, bad data...
            raise MergerError(
                f"lm-eval failed on task {task!r} for member {member.name!r}: {one_line(error)}"
            ) from error
        refuse_unscorable(member, task, loaded)
        try:
            result = evaluate_tasks(
                lm, loaded, limit=self.tasks.limit, log_samples=True, apply_chat_template=chat
            )
        except Exception as error:  # a tokenizer that cannot encode the task's text, bad data...
            raise MergerError(
                f"lm-eval failed on task {task!r} for member {member.name!r}: {one_line(error)}"
            ) from error
        elapsed = time.perf_counter() - started
        # the named metric, else the task's first, as fitness reads it
        scored = scored_samples(result, task, self.tasks.metric)
        refuse_non_binary(member, task, [value for _, value in scored])
        if not scored:
            raise MergerError(f"lm-eval logged no samples for task {task!r} (member {member.name!r})")
        per_item = elapsed / max(1, len(scored))
        return [
            MemberRow(
                item_id=f"{task}:{sample['doc_id']}",
                task=task,
                prompt=_prompt_of(sample),
                correct=correct,
                latency_s=per_item,
            )
            for sample, correct in scored
        ]


REMOTE_OUTPUT_TYPES = ("generate_until",)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def refuse_unscorable(member: Member, task: str, loaded: dict[str, Any]) -> None:
    """A chat-completions member returns text only: it cannot score a task that needs log-likelihoods."""
    if member.remote is None:
        return
    for loaded_task in loaded["tasks"].values():
        output_type = loaded_task.get_config("output_type")
        if output_type not in REMOTE_OUTPUT_TYPES:
            raise MergerError(
                f"member {member.name!r} cannot score task {task!r}: it is a remote chat-completions endpoint "
                f"(text only) and the task asks for {output_type} (log-likelihoods); use a generate_until task"
            )


def refuse_non_binary(member: Member, task: str, values: list[float]) -> None:
    """The head, the oracle and every accuracy read an item's outcome as right (1) or wrong (0)."""
    outside = next((value for value in values if not 0.0 <= value <= 1.0), None)
    if outside is not None:
        raise MergerError(
            f"member {member.name!r} cannot score task {task!r} as right or wrong: its metric gives {outside:.4g}"
            " for an item; name a 0/1 metric in tasks.metric (acc for teacher-forced *_tf tasks)"
        )


def _cache_file(pool: Pool, member: Member, task_key: str) -> Path:
    content = member_content_key(
        member, pool.work_dir / "weights-digests.json", pool.registry_root, pool.exports_dir
    )
    key = hashlib.sha256(f"{content}|{task_key}".encode()).hexdigest()[:20]
    return pool.work_dir / "outcomes" / f"{member.name}-{key}.json"


def member_rows(
    pool: Pool, member: Member, evaluator: Callable[[], _Evaluator], keys: dict[str, str]
) -> tuple[list[MemberRow], list[str]]:
    """(rows on every task, the tasks that had to be evaluated); each task's rows are cached on their own."""
    caches = {task: _cache_file(pool, member, key) for task, key in keys.items()}
    missing = [task for task, cache in caches.items() if not cache.is_file()]
    if missing:
        for task, task_rows in evaluator().rows(member, missing):
            # each task as it finishes: an error in a later task loses none of the earlier ones
            caches[task].parent.mkdir(parents=True, exist_ok=True)
            write_atomic(caches[task], json.dumps([row.__dict__ for row in task_rows]).encode())
    rows: list[MemberRow] = []
    for cache in caches.values():
        rows.extend(MemberRow(**row) for row in json.loads(cache.read_text()))
    return rows, missing


def _progress_line(member: Member, rows: list[MemberRow], evaluated: list[str], tasks: int) -> str:
    if not evaluated:
        state = "cached"
    elif len(evaluated) == tasks:
        state = "evaluated"
    else:
        state = f"{tasks - len(evaluated)} of {tasks} tasks cached, {', '.join(evaluated)} evaluated"
    return f"{member.name}: {len(rows)} items ({state})"


def build_outcome_table(pool: Pool, progress: Any = None) -> OutcomeTable:
    """Evaluate every member on the pool's task set (cached per member and task) and align rows by item."""
    if pool.tasks is None:
        raise MergerError("the pool has no `tasks:` section; the router needs a task set to learn from")
    tasks = pool.tasks
    keys = task_keys(tasks)
    evaluators: list[_Evaluator] = []

    def evaluator() -> _Evaluator:  # built on first need: a fully cached table loads no lm-eval tasks
        if not evaluators:
            evaluators.append(_Evaluator(tasks, pool.registry_root, pool.exports_dir))
        return evaluators[0]

    per_member: dict[str, dict[str, MemberRow]] = {}
    for member in pool.members:
        rows, evaluated = member_rows(pool, member, evaluator, keys)
        if progress is not None:
            progress(_progress_line(member, rows, evaluated, len(keys)))
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
