"""Fine-tune a zoo's specialists from the SmolLM2 base on CPU, cached by recipe and resumable.

Two zoos share this code: the quickstart zoo (`zoo:add`, `zoo:cap`; `merger.zoo.data`) and the
multi-skill zoo (`zoo:skills/add`, ...; `merger.zoo.skills`). Both start from the same base, `zoo:base`.

The cache key hashes everything that decides the weights (the recipe's numbers, the training rows and
the base checkpoint), so a changed recipe builds into a fresh directory and an unchanged one is reused.
Training state is checkpointed every `save_every` steps, so a killed build resumes where it stopped; a
finished specialist is never trained again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from merger.common.errors import MergerError
from merger.common.files import atomic_path, publish_directory, write_atomic
from merger.common.stopping import StopRequested, stop_requested
from merger.zoo import skills as skills_data
from merger.zoo.cache import zoo_cache_root
from merger.zoo.data import SKILLS, Row, completion_text, generate, prompt_text, rows_digest
from merger.zoo.smollm2 import base_checkpoint

RECIPE_VERSION = 1
STATE_FILE = "train_state.pt"
DIGEST_MEMO = ".merger-sha256"
KEY_LENGTH = 16


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that decides a specialist's weights, besides its training rows and the base.

    The defaults are the training settings of every zoo; only `skills` differs between them.
    """

    skills: tuple[str, ...] = SKILLS
    steps: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 3
    seed: int = 0
    save_every: int = 10

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "skills": list(self.skills), "version": RECIPE_VERSION}


def training_rows(skill: str) -> list[Row]:
    return generate()[f"train_{skill}"]


@dataclass(frozen=True)
class Zoo:
    """A family of specialists fine-tuned from the base, one skill each, and how sources name them."""

    name: str
    skills: tuple[str, ...]
    training_rows: Callable[[str], list[Row]]
    data_module: str  # where the training rows come from, named in each specialist's card
    cache_prefix: str  # the cache holds `<cache_prefix>-<key>/<skill>`
    reference_prefix: str  # `zoo:<reference_prefix><skill>`

    def default_recipe(self) -> ZooRecipe:
        return ZooRecipe(skills=self.skills)

    def references(self) -> list[str]:
        return [self.reference_prefix + skill for skill in self.skills]


QUICKSTART_ZOO = Zoo("quickstart", SKILLS, training_rows, "merger.zoo.data", "specialists", "")
SKILLS_ZOO = Zoo(
    "skills", skills_data.SKILLS, skills_data.training_rows, "merger.zoo.skills", "skills", "skills/"
)
ZOOS = {zoo.name: zoo for zoo in (QUICKSTART_ZOO, SKILLS_ZOO)}


def zoo_member(reference: str) -> tuple[Zoo, str]:
    """(zoo, skill) of `zoo:[ZOO/]SKILL`, or (quickstart, "base") for `zoo:base`; checked before building."""
    name = reference.removeprefix("zoo:")
    if name == "base":
        return QUICKSTART_ZOO, "base"
    prefix, slash, skill = name.rpartition("/")
    zoo = next((z for z in ZOOS.values() if z.reference_prefix == prefix + slash), None)
    if zoo is None:
        known = ", ".join(f"zoo:{z.reference_prefix}NAME" for z in ZOOS.values())
        raise MergerError(f"source {reference!r}: no zoo {prefix!r}; a zoo reference is {known} or zoo:base")
    if skill not in zoo.skills:
        names = ("base", *zoo.references()) if zoo is QUICKSTART_ZOO else zoo.references()
        which = "the zoo" if zoo is QUICKSTART_ZOO else f"the {zoo.name} zoo"
        raise MergerError(f"source {reference!r}: {which} has {', '.join(names)}, not {name!r}")
    return zoo, skill


def zoo_checkpoint(reference: str) -> Path:
    """The checkpoint directory of a `zoo:` reference, building the base or that zoo on first use."""
    zoo, skill = zoo_member(reference)
    if skill == "base":
        return base_checkpoint()
    return Path(build_zoo(zoo=zoo)[skill])


def checkpoint_digest(checkpoint: Path) -> str:
    """A hash of a checkpoint's weights and config (the base's identity in the cache key).

    Remembered beside the weights, keyed by their size and mtime, so a warm `build_zoo` skips re-hashing.
    """
    files = [checkpoint / "config.json", checkpoint / "model.safetensors"]
    stamp = " ".join(f"{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in files)
    memo = checkpoint / DIGEST_MEMO
    if memo.is_file():
        remembered_stamp, _, remembered = memo.read_text().partition("\n")
        if remembered_stamp == stamp and remembered:
            return remembered.strip()
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    with contextlib.suppress(OSError):  # a read-only base is fine, it is only hashed again next time
        write_atomic(memo, f"{stamp}\n{digest.hexdigest()}\n".encode())
    return digest.hexdigest()


def recipe_key(recipe: ZooRecipe, data_digests: dict[str, str], base_digest: str) -> str:
    payload = {"recipe": recipe.as_json(), "data": data_digests, "base": base_digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]


def build_zoo(
    cache_dir: Path | None = None,
    progress: bool = True,
    recipe: ZooRecipe | None = None,
    base_dir: Path | None = None,
    threads: int | None = None,
    zoo: Zoo = QUICKSTART_ZOO,
) -> dict[str, Path]:
    """{"base": <dir>, "<skill>": <dir>, ...}: the base and one fine-tuned specialist per skill of `zoo`.

    `base_dir` replaces the SmolLM2 base (tests use a tiny model); its training rows are the zoo's.
    `threads` caps torch's CPU threads (default: all cores; 1 is faster on a crowded machine).
    """
    recipe = recipe or zoo.default_recipe()
    unknown = [skill for skill in recipe.skills if skill not in zoo.skills]
    if unknown:
        raise MergerError(f"the {zoo.name} zoo has skills {', '.join(zoo.skills)}, not {', '.join(unknown)}")
    base = Path(base_dir) if base_dir is not None else base_checkpoint(cache_dir)
    rows = {skill: zoo.training_rows(skill) for skill in recipe.skills}
    key = recipe_key(recipe, {s: rows_digest(r) for s, r in rows.items()}, checkpoint_digest(base))
    zoo_dir = zoo_cache_root(cache_dir) / f"{zoo.cache_prefix}-{key}"
    zoo_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(zoo_dir / "recipe.json", json.dumps(recipe.as_json(), indent=2, sort_keys=True).encode())
    paths = {"base": base}
    for index, skill in enumerate(recipe.skills):
        final = zoo_dir / skill
        if not (final / "model.safetensors").is_file():
            work_dir = zoo_dir / f".work-{skill}"
            card = specialist_card(base, skill, recipe, zoo.data_module)
            train_specialist(base, rows[skill], recipe, index, work_dir, final, card, progress, threads)
        paths[skill] = final
    return paths


def train_specialist(
    base: Path,
    rows: list[dict[str, object]],
    recipe: ZooRecipe,
    skill_index: int,
    work_dir: Path,
    final: Path,
    card: str,
    progress: bool,
    threads: int | None = None,
) -> Path:
    """Full fine-tune of `base` on `rows`, the loss on the answer tokens only, then publish to `final`."""
    with torch_threads(threads or os.cpu_count() or 1):  # the zoo's weights do not depend on the caller
        return _fine_tune(recipe, base, rows, skill_index, work_dir, final, card, progress)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's thread count for a block, then the caller's again (a run that builds its zoo first goes on
    scoring with the threads it was started with: OMP_NUM_THREADS=1 stays 1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fine_tune(
    recipe: ZooRecipe,
    base: Path,
    rows: list[dict[str, object]],
    skill_index: int,
    work_dir: Path,
    final: Path,
    card: str,
    progress: bool,
) -> Path:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, recipe.warmup_steps))
    )
    examples = [encode(tokenizer, row) for row in rows]
    start = resume(work_dir, model, optimizer, schedule)
    name = final.name
    bar = tqdm(total=recipe.steps, initial=start, desc=f"zoo: training {name}", disable=not progress)
    for step in range(start, recipe.steps):
        batch = collate(batch_examples(examples, recipe, skill_index, step), tokenizer.pad_token_id)
        loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        done = step + 1
        stopping = stop_requested() and done < recipe.steps
        if stopping or (done % recipe.save_every == 0 and done < recipe.steps):
            save_state(work_dir, model, optimizer, schedule, done)
        if stopping:  # a `merger run` asked to stop: the next build resumes from this step
            bar.close()
            raise StopRequested
    bar.close()
    model.eval()
    staging = work_dir / "final"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(card)
    publish_directory(staging, final, keep_existing=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    return final


def answer_loss(model, batch):
    """Mean next-token loss on the answer tokens, projecting only those positions onto the vocabulary.

    The vocabulary projection over every prompt position is most of a step's cost at this sequence
    length, and the prompt positions carry no loss.
    """
    import torch

    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    logits = model.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def encode(tokenizer, row: dict[str, object]) -> tuple[list[int], int]:
    """Token ids of prompt + completion, and how many of them are prompt (masked out of the loss)."""
    prompt = tokenizer(prompt_text(row), add_special_tokens=False)["input_ids"]
    completion = tokenizer(completion_text(row), add_special_tokens=False)["input_ids"]
    return prompt + completion, len(prompt)


def batch_examples(
    examples: list[tuple[list[int], int]], recipe: ZooRecipe, skill_index: int, step: int
) -> list[tuple[list[int], int]]:
    """The batch of `step`, a function of the seed and step alone, so a resumed run sees the same data."""
    import torch

    per_epoch = max(1, len(examples) // recipe.batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + skill_index * 1009 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    start = position * recipe.batch_size
    return [examples[i] for i in order[start : start + recipe.batch_size]]


def collate(examples: list[tuple[list[int], int]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def save_state(work_dir: Path, model, optimizer, schedule, step: int) -> None:
    import torch

    work_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
    }
    with atomic_path(work_dir / STATE_FILE) as partial:
        torch.save(state, partial)


def resume(work_dir: Path, model, optimizer, schedule) -> int:
    """Load the last saved training state if there is one; the step to continue from."""
    import torch

    state_path = work_dir / STATE_FILE
    if not state_path.is_file():
        return 0
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return int(state["step"])


def specialist_card(base: Path, skill: str, recipe: ZooRecipe, data_module: str) -> str:
    settings = json.dumps(recipe.as_json(), indent=2, sort_keys=True)
    return f"""# zoo specialist: {skill}

Full fine-tune of `{base.name}` on the `train_{skill}` items of `{data_module}`, on CPU.

```json
{settings}
```
"""
