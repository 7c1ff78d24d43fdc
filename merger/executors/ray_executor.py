"""Candidates evaluated in parallel on Ray: one actor per GPU or per `cpus_per_worker` cores.

Each actor holds its own `CandidateWorker` (sources resident, one model, lm-eval tasks loaded), so
only `ScoreJob`s go out and `ScoreResult`s come back. An actor that dies is replaced and its
job queued again; the search loop tells pycma in candidate order, so the results do not depend on
which actor finished first. A stop asked for (SIGINT/SIGTERM) reaches the actors too: each runs two
calls at once, so `stop` lands while `score` runs, and the job in flight ends at its next lm-eval batch,
unreported (the ledger never saw it: a resume scores it again).

On a cluster (`executor.address`), every node needs `merger` installed and the sources, task files
and run directory at the same paths as the driver (shared storage).
"""

from __future__ import annotations

import os
import signal
import site
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.stopping import StopRequested, clear_stop, request_stop, stop_requested
from merger.executors import ScoreJob, ScoreResult, never
from merger.executors.worker import CandidateWorker
from merger.recipe import Recipe

if TYPE_CHECKING:
    from merger.space import SearchSpace

# A candidate whose worker dies this many times is recorded as failed rather than retried forever
# (a merge that crashes its process, e.g. out of host memory, must not stall the run).
MAX_ATTEMPTS = 3
WAIT_SECONDS = 0.5  # how often the dispatch loop wakes up while waiting for results
# Driver environment that workers need to behave as the driver does (offline, quiet).
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "TOKENIZERS_PARALLELISM",
    "TRANSFORMERS_VERBOSITY",
    "TQDM_DISABLE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "MERGER_HOME",
)
MERGER_IMPORT_ROOT = Path(__file__).resolve().parents[2]  # the directory the driver imported merger from


class WorkerActor:
    """The body of one Ray actor: a `CandidateWorker` and the torch threads it may use."""

    def __init__(self, recipe: Recipe, source_paths: dict[str, Path], space: SearchSpace, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.worker = CandidateWorker(recipe, source_paths, space)

    def pid(self) -> int:
        return os.getpid()

    def score(self, job: ScoreJob) -> ScoreResult | None:
        """The job's result; None when `stop` ended it between two lm-eval batches."""
        clear_stop()  # a stop that landed after the last job ended is not this job's
        try:
            return self.worker.score(job)
        except StopRequested:
            clear_stop()
            return None

    def stop(self) -> None:
        """End the `score` in flight at its next lm-eval batch (it runs beside it: `max_concurrency`)."""
        request_stop()

    def item_ids(self, eval_set: str = "fitness") -> dict[str, list[int]]:
        return self.worker.item_ids(eval_set)

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        return self.worker.write_scored_weights(genotype, checkpoint)


def source_tree_for_workers(import_root: Path = MERGER_IMPORT_ROOT) -> Path | None:
    """Where the actors must import `merger` from: None when the driver's `merger` is installed (the
    actors import the same installed package), else the source tree the driver runs from."""
    installed = {Path(p).resolve() for p in (*site.getsitepackages(), site.getusersitepackages())}
    return None if import_root.resolve() in installed else import_root


def worker_runtime_env(import_root: Path = MERGER_IMPORT_ROOT) -> dict[str, Any]:
    """Environment for the actors: the driver's offline/quiet settings and, when the driver runs
    `merger` from a source tree, that tree first on their path."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    source_tree = source_tree_for_workers(import_root)
    python_path = [str(source_tree)] if source_tree is not None else []
    python_path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(python_path))
    return {"env_vars": env}


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """A dead or unreachable actor, or a call that raised past the worker's own failure handling
    (`CandidateWorker.evaluate` records every Exception, so only e.g. a KeyboardInterrupt gets here):
    either way the actor is replaced, as its resident model may be half merged."""
    from ray import exceptions

    unavailable = getattr(exceptions, "ActorUnavailableError", exceptions.RayActorError)  # Ray >= 2.24
    return (exceptions.RayActorError, unavailable, exceptions.RayTaskError)


class RayExecutor:
    def __init__(self, recipe: Recipe, source_paths: dict[str, Path], space: SearchSpace):
        import ray

        self.ray = ray
        self.settings = recipe.executor
        self.started_ray = False
        self.actors: list[Any] = []
        self.lost_workers = 0
        if not ray.is_initialized():
            self._start_ray()
        self._check_capacity()
        self._actor_class = ray.remote(WorkerActor).options(
            num_cpus=self.settings.cpus_per_worker,
            num_gpus=self.settings.gpus_per_worker,
            max_restarts=0,  # a dead actor is replaced here, so that its candidate can be re-queued
            max_concurrency=2,  # `stop` runs beside the `score` in flight (the driver never sends two scores)
            runtime_env=worker_runtime_env(),
        )
        self._worker_args = (recipe, source_paths, space, max(1, round(self.settings.cpus_per_worker)))
        self.actors = [self._actor_class.remote(*self._worker_args) for _ in range(self.settings.num_workers)]
        self.worker_pids = self._wait_ready()

    def _start_ray(self) -> None:
        address = self.settings.address
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None and not os.environ.get("RAY_ADDRESS"):  # RAY_ADDRESS: ray.init joins that cluster
            options["num_cpus"] = os.cpu_count() or 1
        run_handler = signal.getsignal(signal.SIGTERM)
        try:
            self.ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
            raise MergerError(f"executor.address: could not start or reach {where}: {error}") from None
        finally:
            # ray.init puts sys.exit in SIGTERM's place: the run's stop (merger.common.stopping) goes back
            if run_handler is not None and signal.getsignal(signal.SIGTERM) is not run_handler:
                signal.signal(signal.SIGTERM, run_handler)
        self.started_ray = True

    def _check_capacity(self) -> None:
        """Fail now rather than wait forever for actors that can never be placed."""
        total = self.ray.cluster_resources()
        wanted = {
            "CPU": self.settings.num_workers * self.settings.cpus_per_worker,
            "GPU": self.settings.num_workers * self.settings.gpus_per_worker,
        }
        for resource, amount in wanted.items():
            if amount > total.get(resource, 0) + 1e-9:
                self.close()
                raise MergerError(
                    f"executor: {self.settings.num_workers} workers need {amount:g} {resource} in all but the "
                    f"Ray cluster has {total.get(resource, 0):g}; lower executor.num_workers or "
                    f"executor.{resource.lower()}s_per_worker"
                )

    def _wait_ready(self) -> list[int]:
        try:
            return self.ray.get([actor.pid.remote() for actor in self.actors])
        except lost_worker_errors() as error:
            self.close()
            raise MergerError(
                f"executor: a Ray worker could not load the sources and tasks: {root_cause(error)}"
            ) from None

    def _replace(self, slot: int) -> None:
        self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._actor_class.remote(*self._worker_args)
        self.worker_pids[slot] = -1  # unknown until the new actor answers
        self.lost_workers += 1

    def _spread(
        self,
        count: int,
        submit: Callable[[Any, int], Any],
        on_result: Callable[[int, Any], None],
        on_given_up: Callable[[int, BaseException], None],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Jobs 0..count-1, each on the next free worker (`submit(actor, job)` returns its reference). A job
        whose worker is lost goes to the replacement, at most MAX_ATTEMPTS times, then to `on_given_up`.
        Once `should_stop()` is true no new job starts; those in flight finish. Once a stop is asked for
        (merger.common.stopping), those in flight are told to stop too, and a job ended so is not reported."""
        queue = deque(range(count))
        attempts = [0] * count
        idle = deque(range(len(self.actors)))
        in_flight: dict[Any, tuple[int, int]] = {}  # reference -> (worker slot, job)
        while queue or in_flight:
            while queue and idle and not should_stop() and not stop_requested():
                slot, job = idle.popleft(), queue.popleft()
                in_flight[submit(self.actors[slot], job)] = (slot, job)
            if not in_flight:
                break  # a stop was requested: nothing running and nothing more to start
            if stop_requested():  # told at every wake-up: a stop that lands before its job starts is cleared
                for slot, _ in in_flight.values():
                    self.actors[slot].stop.remote()
            ready, _ = self.ray.wait(list(in_flight), num_returns=1, timeout=WAIT_SECONDS)
            for reference in ready:
                slot, job = in_flight.pop(reference)
                try:
                    result = self.ray.get(reference)
                except lost_worker_errors() as error:
                    self._replace(slot)
                    attempts[job] += 1
                    if attempts[job] >= MAX_ATTEMPTS:
                        on_given_up(job, error)
                    else:
                        queue.appendleft(job)
                else:
                    if result is not None:  # None: stopped between batches, so not scored
                        on_result(job, result)
                idle.append(slot)

    def score(
        self,
        jobs: Sequence[ScoreJob],
        on_result: Callable[[int, ScoreResult], None],
        should_stop: Callable[[], bool] = never,
    ) -> None:
        def give_up(job: int, error: BaseException) -> None:
            reason = f"worker died {MAX_ATTEMPTS} times scoring this model ({root_cause(error)})"
            on_result(job, ScoreResult(jobs[job].key, failure=reason))

        self._spread(len(jobs), lambda actor, job: actor.score.remote(jobs[job]), on_result, give_up, should_stop)

    def item_ids(self, eval_set: str = "fitness") -> dict[str, list[int]]:
        return self._on_one_actor("item_ids", eval_set)

    def _on_one_actor(self, method: str, *args: Any) -> Any:
        """Run one call on the first actor, replacing the actor if it dies underneath."""
        lost: BaseException | None = None
        for _ in range(MAX_ATTEMPTS):
            try:
                return self.ray.get(getattr(self.actors[0], method).remote(*args))
            except lost_worker_errors() as error:
                lost = error
                self._replace(0)
        raise MergerError(
            f"executor: the Ray worker died {MAX_ATTEMPTS} times running {method}: {root_cause(lost)}"
        )

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        return self._on_one_actor("write_scored_weights", genotype, checkpoint)

    def close(self) -> None:
        if self.ray.is_initialized():
            for actor in self.actors:
                self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_ray = False


def root_cause(error: BaseException | None) -> str:
    """The last line of a Ray error (its text ends with the remote traceback's exception line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__
