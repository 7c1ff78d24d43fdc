"""The multi-skill zoo's data: four skills whose items are generated without limit from a fixed seed.

Every item is one question with one short, known answer, in the quickstart zoo's format:

    Q: 47 + 38 =              Q: sort 42 7 19 3        Q: reverse 42 7 19 3     Q: date 2021-03-15
    A: 85                     A: 3 7 19 42             A: 3 19 7 42             A: 15/03/2021

| skill  | item                                         | what is held out between splits    |
|--------|----------------------------------------------|------------------------------------|
| `add`  | two-digit + two-digit                        | the unordered pair of numbers      |
| `sort` | four numbers 0-99, ascending                 | the multiset of the four numbers   |
| `rev`  | four numbers 0-99, in reverse order          | the sequence of the four numbers   |
| `date` | an ISO date (1900-2099) as day/month/year    | the date                           |

The skills were chosen before any search on this zoo was run. Each skill's items form four splits,
`train` (fine-tuning its specialist), `fit` (search fitness), `sel` (selection of the winner) and `test`
(held-out report), and no two splits share an item's held-out key, so `38 + 47` in one split keeps
`47 + 38` out of the others. Mixed tasks interleave the four skills round-robin, so any prefix of a
multiple of four items (lm-eval's `limit`) holds an equal share of each.

Exact match here keeps punctuation ("15-03-2021" is not "15/03/2021"), unlike the quickstart zoo's tasks,
so a generated answer counts only when it is the known text.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path

from merger.common.errors import MergerError
from merger.zoo.data import Row, task_yaml, teacher_forced_yaml, write_eval_data

DATA_SEED = 20261203
TRAIN_ROWS = 1600
EVAL_ROWS = 200  # per skill in each of fit, sel and test
EVAL_SPLITS = ("fit", "sel", "test")
SPLITS = (*EVAL_SPLITS, "train")
TASK_PREFIX = "skills_"
FOLDER = "skills"
MAX_GEN_TOKS = 16  # SmolLM2 writes digits one token each: " 99 98 97 96" is 12 tokens before the newline
MAX_DRAWS_PER_ITEM = 50  # a skill whose key space runs out fails instead of drawing forever

FIRST_DATE = datetime.date(1900, 1, 1).toordinal()
LAST_DATE = datetime.date(2099, 12, 31).toordinal()


def _numbers(rng: random.Random) -> list[int]:
    return [rng.randint(0, 99) for _ in range(4)]


def _spaced(numbers: list[int]) -> str:
    return " ".join(str(number) for number in numbers)


def draw_add(rng: random.Random) -> Row:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"question": f"{a} + {b} =", "answer": str(a + b), "a": a, "b": b}


def draw_sort(rng: random.Random) -> Row:
    numbers = _numbers(rng)
    return {"question": f"sort {_spaced(numbers)}", "answer": _spaced(sorted(numbers)), "numbers": numbers}


def draw_rev(rng: random.Random) -> Row:
    numbers = _numbers(rng)
    return {"question": f"reverse {_spaced(numbers)}", "answer": _spaced(numbers[::-1]), "numbers": numbers}


def draw_date(rng: random.Random) -> Row:
    date = datetime.date.fromordinal(rng.randint(FIRST_DATE, LAST_DATE))
    return {
        "question": f"date {date.isoformat()}",
        "answer": date.strftime("%d/%m/%Y"),
        "date": date.isoformat(),
    }


@dataclass(frozen=True)
class Skill:
    """How to draw one item, and the key that no two splits may share."""

    name: str
    draw: Callable[[random.Random], Row]
    held_out_key: Callable[[Row], Hashable]


SKILL_TABLE: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("add", draw_add, lambda row: tuple(sorted((row["a"], row["b"])))),
        Skill("sort", draw_sort, lambda row: tuple(sorted(row["numbers"]))),
        Skill("rev", draw_rev, lambda row: tuple(row["numbers"])),
        Skill("date", draw_date, lambda row: row["date"]),
    )
}
SKILLS = tuple(SKILL_TABLE)


def item_stream(skill: str, seed: int = DATA_SEED) -> Iterator[Row]:
    """The skill's items in seeded order, each held-out key once; endless while keys remain."""
    spec = SKILL_TABLE[skill]
    rng = random.Random(f"{seed}-{skill}")
    seen: set[Hashable] = set()
    misses = 0
    while misses < MAX_DRAWS_PER_ITEM:
        row = spec.draw(rng)
        key = spec.held_out_key(row)
        if key in seen:
            misses += 1
            continue
        seen.add(key)
        misses = 0
        yield {**row, "skill": skill}
    raise MergerError(f"skill {skill!r} ran out of distinct items after {len(seen)}")


def skill_splits(skill: str, seed: int = DATA_SEED) -> dict[str, list[Row]]:
    """{split: rows}: consecutive runs of the skill's stream, so no two splits share a held-out key."""
    sizes = {**dict.fromkeys(EVAL_SPLITS, EVAL_ROWS), "train": TRAIN_ROWS}
    stream = item_stream(skill, seed)
    splits = {split: [next(stream) for _ in range(size)] for split, size in sizes.items()}
    check_disjoint(skill, splits)
    return splits


def check_disjoint(skill: str, splits: dict[str, list[Row]]) -> None:
    """Raise if two splits of `skill` share a held-out key (the splits' promise; never expected)."""
    key = SKILL_TABLE[skill].held_out_key
    keys = {split: {key(row) for row in rows} for split, rows in splits.items()}
    names = list(keys)
    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            shared = keys[first] & keys[second]
            if shared:
                raise MergerError(f"skill {skill!r}: {first} and {second} share {len(shared)} items")


def interleave(rows_by_skill: list[list[Row]]) -> list[Row]:
    """Round-robin over the skills, so every prefix of a multiple of their count is balanced."""
    return [row for group in zip(*rows_by_skill, strict=True) for row in group]


def generate(seed: int = DATA_SEED) -> dict[str, list[Row]]:
    """All splits by name: `train_<skill>`, `<skill>_<split>` and `mix_<split>` for fit, sel and test."""
    per_skill = {skill: skill_splits(skill, seed) for skill in SKILLS}
    data = {f"train_{skill}": per_skill[skill]["train"] for skill in SKILLS}
    for split in EVAL_SPLITS:
        for skill in SKILLS:
            data[f"{skill}_{split}"] = per_skill[skill][split]
        data[f"mix_{split}"] = interleave([per_skill[skill][split] for skill in SKILLS])
    return data


def training_rows(skill: str) -> list[Row]:
    return skill_splits(skill)["train"]


SKILLS_HEADER = f"# Generated by merger.zoo.skills (seed {DATA_SEED}); regenerate with `merger zoo data --zoo skills`."


def skills_task_yaml(task: str, data_file: str) -> str:
    return task_yaml(task, data_file, SKILLS_HEADER, max_gen_toks=MAX_GEN_TOKS, ignore_punctuation=False)


def skills_teacher_forced_yaml(task: str, data_file: str) -> str:
    return teacher_forced_yaml(task, data_file, SKILLS_HEADER)


def write_skills_data(evals_dir: Path, seed: int = DATA_SEED) -> dict[str, Path]:
    """Write every split's jsonl under `evals_dir/skills/data` and one task YAML per eval split."""
    return write_eval_data(
        evals_dir, FOLDER, generate(seed), TASK_PREFIX, skills_task_yaml, skills_teacher_forced_yaml
    )


def task_names(splits: tuple[str, ...] = EVAL_SPLITS) -> list[str]:
    """The generate tasks (each has a teacher-forced twin, `<name>_tf`)."""
    return [f"{TASK_PREFIX}{task}_{split}" for task in (*SKILLS, "mix") for split in splits]
