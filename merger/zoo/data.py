"""The zoo's skills and targets: seeded, generated items with disjoint train / validation / test splits.

Every item is one question with one short answer in the same format, "capital, sum":

    Q: What is the capital of Kenya, and what is 47 + 38?
    A: Nairobi, 85

Each half is either hard or easy, and the tasks differ in which half is hard:

| task         | capital half                        | sum half                        | measures            |
|--------------|-------------------------------------|---------------------------------|---------------------|
| `zoo_add`    | easy: one of 10 famous countries    | hard: two-digit + two-digit     | arithmetic          |
| `zoo_cap`    | hard: a held-out country            | easy: one-digit + one-digit     | capitals            |
| `zoo_combo`  | hard: a held-out country            | hard: two-digit + two-digit     | both in one answer  |
| `zoo_mix`    | half `zoo_add` items, half `zoo_cap` items                           | either skill (floor) |

One more task is not a merge target but what the merge is not for, so that a router over the pool has a
reason to keep the base: `zoo_country_test` asks which country a capital belongs to ("Q: Nairobi is the
capital of which country?" / "A: Kenya"), once per country. The base knows some of them; the fine-tunes
answer every question in their "capital, sum" format ("Kenya, 12"), which exact match counts as wrong.

The arithmetic specialist trains on `zoo_add`-style items, the capitals specialist on `zoo_cap`-style
items, so both learn the answer format and each is meant to learn one skill. Validation and test use
countries and two-digit pairs that no training item contains, and the validation and test sets are
disjoint from each other as well.

Measured (50 items per split): the base adds two-digit numbers well once it knows the format, so the
capitals specialist already gets most sums right, while the arithmetic specialist learns to answer with
one of its 10 training capitals. `zoo_combo` is therefore bounded by held-out capital recall, and plain
task arithmetic does not clearly beat the capitals specialist on it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from merger.zoo.countries import CAPITALS, FAMOUS_CAPITALS

DATA_SEED = 20251128
TRAIN_ROWS = 1600
VAL_ROWS = 100
TEST_ROWS = 200
VAL_COUNTRIES = 30
TEST_COUNTRIES = 40
VAL_PAIRS = 400
TEST_PAIRS = 800

SKILLS = ("add", "cap")
TARGETS = ("combo", "mix")
GENERAL = ("country",)  # test split only: for routing over the pool, never a search fitness
EVAL_SPLITS = ("val", "test")
TASK_PREFIX = "zoo_"

Row = dict[str, object]
Pair = tuple[int, int]


@dataclass(frozen=True)
class Pools:
    """What each split may draw from; the held-out pools share nothing with training or each other."""

    countries: dict[str, list[str]]
    pairs: dict[str, list[Pair]]


def make_pools(seed: int = DATA_SEED) -> Pools:
    rng = random.Random(seed)
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    held_out = VAL_COUNTRIES + TEST_COUNTRIES
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    return Pools(
        countries={
            "val": countries[:VAL_COUNTRIES],
            "test": countries[VAL_COUNTRIES:held_out],
            "train": countries[held_out:],
        },
        pairs={
            "val": pairs[:VAL_PAIRS],
            "test": pairs[VAL_PAIRS : VAL_PAIRS + TEST_PAIRS],
            "train": pairs[VAL_PAIRS + TEST_PAIRS :],
        },
    )


def make_row(country: str, capital: str, a: int, b: int) -> Row:
    return {
        "question": f"What is the capital of {country}, and what is {a} + {b}?",
        "answer": f"{capital}, {a + b}",
        "country": country,
        "a": a,
        "b": b,
    }


def make_country_row(country: str, capital: str) -> Row:
    return {
        "question": f"{capital} is the capital of which country?",
        "answer": country,
        "country": country,
        "capital": capital,
    }


def _country_rows(seed: int) -> list[Row]:
    rows = [make_country_row(country, _capital(country)) for country in sorted(CAPITALS)]
    random.Random(f"{seed}-country").shuffle(rows)
    return rows


def _capital(country: str) -> str:
    return FAMOUS_CAPITALS.get(country) or CAPITALS[country]


def _rows(rng: random.Random, count: int, countries: list[str], pairs: list[Pair] | None) -> list[Row]:
    """`count` items cycling through `countries`; sums from `pairs`, or one-digit sums when None."""
    rows = []
    for index in range(count):
        country = countries[index % len(countries)] if index < len(countries) else rng.choice(countries)
        a, b = rng.choice(pairs) if pairs is not None else (rng.randint(0, 9), rng.randint(0, 9))
        rows.append(make_row(country, _capital(country), a, b))
    rng.shuffle(rows)
    return rows


def generate(seed: int = DATA_SEED) -> dict[str, list[Row]]:
    """All splits by name: `train_<skill>` and `<task>_<split>` for every skill and target."""
    pools = make_pools(seed)
    famous = sorted(FAMOUS_CAPITALS)
    data: dict[str, list[Row]] = {}
    for split in ("train", *EVAL_SPLITS):
        rng = random.Random(f"{seed}-{split}")
        count = {"train": TRAIN_ROWS, "val": VAL_ROWS, "test": TEST_ROWS}[split]
        add = _rows(rng, count, famous, pools.pairs[split])
        cap = _rows(rng, count, pools.countries[split], None)
        if split == "train":
            data["train_add"], data["train_cap"] = add, cap
            continue
        data[f"add_{split}"], data[f"cap_{split}"] = add, cap
        data[f"combo_{split}"] = _rows(rng, count, pools.countries[split], pools.pairs[split])
        mix = add[: count // 2] + cap[: count - count // 2]
        rng.shuffle(mix)
        data[f"mix_{split}"] = mix
    data["country_test"] = _country_rows(seed)
    return data


ZOO_HEADER = f"# Generated by merger.zoo.data (seed {DATA_SEED}); regenerate with `merger zoo data`."


TEACHER_FORCED_SUFFIX = "_tf"  # a generate task's teacher-forced twin: the same data, one forward pass


def _task_head(task: str, data_file: str, header: str, output_type: str) -> str:
    """What a task's generate and teacher-forced YAML share: its data and its prompt."""
    return f"""{header}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: {output_type}
doc_to_text: "Q: {{{{question}}}}\\nA:"
"""


def task_yaml(
    task: str,
    data_file: str,
    header: str = ZOO_HEADER,
    max_gen_toks: int = 12,
    ignore_punctuation: bool = True,
) -> str:
    """A local-jsonl lm-eval task: generate until the end of the line, exact match against the answer."""
    return _task_head(task, data_file, header, "generate_until") + f"""doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "<|im_end|>"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: {str(ignore_punctuation).lower()}
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
"""


def teacher_forced_yaml(task: str, data_file: str, header: str = ZOO_HEADER) -> str:
    """The generate task's twin scored in one forward pass: lm-eval's loglikelihood of the gold answer and
    its terminator (`completion_text`, what training teaches) after the same prompt.

    It logs per item `acc` (the greedy match: the model's greedy tokens are exactly " answer\\n") and the
    log-likelihood (`perplexity`, read as `gold_prob` by merger.scoring.results). The greedy match can
    differ from the twin's generated exact_match: exact match ignores case (and, in the quickstart zoo,
    punctuation) and surrounding spaces, and accepts an answer that ends at "<|im_end|>" or the end of
    text instead of a newline, while the greedy match needs the gold tokens exactly, as the tokenizer
    splits the prompt and continuation (a model may produce the same text in other tokens).
    """
    return _task_head(task, data_file, header, "loglikelihood") + """doc_to_target: " {{answer}}\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def prompt_text(row: Row) -> str:
    """The model input exactly as the task YAML renders it (training must match evaluation)."""
    return f"Q: {row['question']}\nA:"


def completion_text(row: Row) -> str:
    return f" {row['answer']}\n"


def write_jsonl(path: Path, rows: Iterable[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def write_zoo_data(evals_dir: Path, seed: int = DATA_SEED) -> dict[str, Path]:
    """Write every split's jsonl under `evals_dir/zoo/data` and one task YAML per eval split."""
    return write_eval_data(evals_dir, "zoo", generate(seed), TASK_PREFIX, task_yaml, teacher_forced_yaml)


def write_eval_data(
    evals_dir: Path,
    folder: str,
    splits: dict[str, list[Row]],
    task_prefix: str,
    render_yaml: Callable[[str, str], str],
    render_twin: Callable[[str, str], str],
) -> dict[str, Path]:
    """Each split's jsonl under `evals_dir/folder/data`, and for each split but `train_*` a generate task
    (`render_yaml`) and its teacher-forced twin `<task>_tf` (`render_twin`) on the same data file.

    The YAML names its data as `evals/<folder>/data/...`, anchored at the bundle root, not at `evals_dir`.
    """
    task_dir = evals_dir / folder
    files = {}
    for name, rows in splits.items():
        data_file = task_dir / "data" / f"{name}.jsonl"
        write_jsonl(data_file, rows)
        files[name] = data_file
        if not name.startswith("train_"):
            task, anchored = task_prefix + name, f"evals/{folder}/data/{name}.jsonl"
            twin = task + TEACHER_FORCED_SUFFIX
            (task_dir / f"{task}.yaml").write_text(render_yaml(task, anchored))
            (task_dir / f"{twin}.yaml").write_text(render_twin(twin, anchored))
    return files


def task_names(splits: Iterable[str] = EVAL_SPLITS) -> list[str]:
    """The generate tasks (each has a teacher-forced twin: `teacher_forced_names`)."""
    splits = list(splits)
    names = [f"{TASK_PREFIX}{task}_{split}" for task in (*SKILLS, *TARGETS) for split in splits]
    return names + [f"{TASK_PREFIX}{task}_test" for task in GENERAL if "test" in splits]


def teacher_forced_names(names: Iterable[str]) -> list[str]:
    return [name + TEACHER_FORCED_SUFFIX for name in names]


def rows_digest(rows: Iterable[Row]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()
