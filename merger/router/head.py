"""The router head: embedding → a score per member and logits for the roles, trained with sep-CMA-ES.

Role targets come from the outcome table, not from labels: an item that every member gets right needs only a
Worker (one call), one that some get right needs a Verifier, one that nobody gets right needs a Thinker's plan.
Where the pool has measured workflow depth (merger.router.depth), the targets come from that instead: the
Worker where plan–execute–verify did not raise the item's correctness, the Thinker where it did.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from merger.common.errors import MergerError
from merger.common.files import atomic_path, write_atomic
from merger.router.pool import MAX_HEAD_PARAMETERS, ROLES, Role, RouterSettings

HEAD_WEIGHTS = "head.safetensors"
HEAD_META = "head.json"
L2_WEIGHT = 1e-4


@dataclass
class RouterHead:
    members: list[str]
    encoder_id: str
    mean: np.ndarray
    scale: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w1: np.ndarray | None = None
    b1: np.ndarray | None = None
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """Trainable parameters (the standardisation statistics are fixed, not learned)."""
        arrays = [self.w2, self.b2] + ([self.w1, self.b1] if self.w1 is not None else [])
        return int(sum(array.size for array in arrays))

    def forward(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(member scores (n, M), role logits (n, 3)) for unit-norm embeddings (n, d)."""
        features = (embeddings - self.mean) / self.scale
        if self.w1 is not None:
            features = np.tanh(features @ self.w1 + self.b1)
        out = features @ self.w2 + self.b2
        return out[:, : len(self.members)], out[:, len(self.members) :]

    def choose(self, embeddings: np.ndarray) -> np.ndarray:
        return self.forward(embeddings)[0].argmax(axis=1)

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "scale": self.scale, "w2": self.w2, "b2": self.b2}
        if self.w1 is not None and self.b1 is not None:
            tensors.update(w1=self.w1, b1=self.b1)
        with atomic_path(directory / HEAD_WEIGHTS) as partial:
            save_file(
                {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in tensors.items()},
                str(partial),
            )
        meta = {
            "members": self.members,
            "encoder_id": self.encoder_id,
            "roles": [r.value for r in ROLES],
            **self.meta,
        }
        write_atomic(directory / HEAD_META, json.dumps(meta, indent=2).encode())

    @classmethod
    def load(cls, directory: Path) -> RouterHead:
        from safetensors.numpy import load_file

        if not (directory / HEAD_WEIGHTS).is_file() or not (directory / HEAD_META).is_file():
            raise MergerError(
                f"no trained router head in {directory}; run `merger router train POOL.yaml` first"
            )
        tensors = load_file(str(directory / HEAD_WEIGHTS))
        meta = json.loads((directory / HEAD_META).read_text())
        members = meta.pop("members")
        encoder_id = meta.pop("encoder_id")
        return cls(
            members=members,
            encoder_id=encoder_id,
            mean=tensors["mean"],
            scale=tensors["scale"],
            w2=tensors["w2"],
            b2=tensors["b2"],
            w1=tensors.get("w1"),
            b1=tensors.get("b1"),
            meta=meta,
        )


def role_targets(correct: np.ndarray) -> np.ndarray:
    """Index into ROLES per item: nobody right → thinker, some → verifier, all → worker."""
    right = (correct >= 0.5).sum(axis=1)
    targets = np.full(len(correct), ROLES.index(Role.VERIFIER))
    targets[right == 0] = ROLES.index(Role.THINKER)
    targets[right == correct.shape[1]] = ROLES.index(Role.WORKER)
    return targets


def _shapes(dim: int, hidden: int, outputs: int) -> list[tuple[str, tuple[int, ...]]]:
    if hidden == 0:
        return [("w2", (dim, outputs)), ("b2", (outputs,))]
    return [("w1", (dim, hidden)), ("b1", (hidden,)), ("w2", (hidden, outputs)), ("b2", (outputs,))]


def parameter_count(dim: int, hidden: int, members: int) -> int:
    return sum(int(np.prod(shape)) for _, shape in _shapes(dim, hidden, members + len(ROLES)))


def _unpack(vector: np.ndarray, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    arrays, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        arrays[name] = vector[offset : offset + size].reshape(shape)
        offset += size
    return arrays


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def utility(
    correct: np.ndarray, cost: np.ndarray | None, latency: np.ndarray, settings: RouterSettings
) -> np.ndarray:
    """Per item × member value of choosing that member: correctness minus the configured penalties."""
    value = correct.astype(np.float64).copy()
    if cost is not None and settings.cost_penalty:
        value -= settings.cost_penalty * cost
    if settings.latency_penalty:
        value -= settings.latency_penalty * latency
    return value


def train_head(
    embeddings: np.ndarray,
    correct: np.ndarray,
    members: list[str],
    encoder_id: str,
    settings: RouterSettings,
    cost: np.ndarray | None = None,
    latency: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
    roles: np.ndarray | None = None,
) -> RouterHead:
    """Fit the head with sep-CMA-ES (pycma, diagonal covariance) on expected utility of the chosen member."""
    import cma

    count, dim = embeddings.shape
    if count < 2:
        raise MergerError(f"router training needs at least 2 items, got {count}")
    outputs = len(members) + len(ROLES)
    shapes = _shapes(dim, settings.hidden_size, outputs)
    size = parameter_count(dim, settings.hidden_size, len(members))
    if size >= MAX_HEAD_PARAMETERS:
        raise MergerError(
            f"router head would have {size} parameters (limit {MAX_HEAD_PARAMETERS}): "
            f"lower router.hidden_size ({settings.hidden_size}) for {dim}-d embeddings and {len(members)} members"
        )
    mean = embeddings.mean(axis=0)
    spread = embeddings.std(axis=0)
    # a floor keeps near-constant training dimensions from blowing up on unseen prompts
    scale = np.maximum(spread, 0.25 * float(spread.mean()) + 1e-6)
    features = (embeddings - mean) / scale
    values = utility(correct, cost, latency if latency is not None else np.zeros_like(correct), settings)
    roles = role_targets(correct) if roles is None else roles
    known = roles >= 0  # an item without a target (merger.router.depth.UNKNOWN_ROLE) adds no role loss
    role_onehot = np.eye(len(ROLES))[np.where(known, roles, 0)] * known[:, None]
    role_items = max(1, int(known.sum()))

    def loss(vector: np.ndarray) -> float:
        arrays = _unpack(np.asarray(vector), shapes)
        hidden = np.tanh(features @ arrays["w1"] + arrays["b1"]) if "w1" in arrays else features
        out = hidden @ arrays["w2"] + arrays["b2"]
        choice = softmax(out[:, : len(members)] / settings.temperature)
        expected = float((choice * values).sum(axis=1).mean())
        role_log_probs = np.log(softmax(out[:, len(members) :]) + 1e-12)
        role_loss = float(-(role_onehot * role_log_probs).sum() / role_items)
        return -expected + settings.role_weight * role_loss + L2_WEIGHT * float(np.dot(vector, vector))

    rng = np.random.default_rng(settings.seed)
    x0 = rng.normal(0.0, 0.01, size)
    options = {
        "CMA_diagonal": True,
        "seed": settings.seed + 1,
        "maxfevals": settings.evaluations,
        "verbose": -9,
        "tolfun": 1e-9,
        "tolx": 1e-10,
    }
    if settings.population:
        options["popsize"] = settings.population
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pycma's notes on large steps and missing matplotlib
        strategy = cma.CMAEvolutionStrategy(x0, settings.sigma0, options)
        while not strategy.stop():
            candidates = strategy.ask()
            strategy.tell(candidates, [loss(candidate) for candidate in candidates])
            if progress is not None and strategy.countiter % 50 == 0:
                progress(f"cma iteration {strategy.countiter}: best loss {strategy.result.fbest:.4f}")
    arrays = _unpack(np.asarray(strategy.result.xbest, dtype=np.float64), shapes)
    return RouterHead(
        members=list(members),
        encoder_id=encoder_id,
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        w2=arrays["w2"].astype(np.float32),
        b2=arrays["b2"].astype(np.float32),
        w1=arrays["w1"].astype(np.float32) if "w1" in arrays else None,
        b1=arrays["b1"].astype(np.float32) if "b1" in arrays else None,
        meta={
            "hidden_size": settings.hidden_size,
            "parameters": size,
            "evaluations": int(strategy.result.evaluations),
            "best_loss": float(strategy.result.fbest),
            "optimizer": "sep-CMA-ES (pycma, CMA_diagonal=True)",
        },
    )
