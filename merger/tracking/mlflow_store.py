"""MLflow as a run's tracker: the only module that imports mlflow (the `track` extra).

One MLflow run per run directory and store: its id is kept in the run directory (`tracking.json`, by
tracking URI) from the moment it is made, so every later sitting, and `merger track sync`, continues it
instead of starting a second one; the tag `merger.run_dir` names the directory in MLflow's UI. Candidates are steps of that run,
not nested runs: MLflow's charts then draw fitness over every candidate of the search in one plot,
where forty nested runs would each hold a single point.
"""

from __future__ import annotations

from pathlib import Path

from merger.common.errors import MergerError

RUN_DIR_TAG = "merger.run_dir"
INSTALL = "pip install 'merger[track]'"


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def default_uri(run_dir: Path) -> str:
    """A SQLite store beside the run directory: the runs of one folder share one store and one `mlflow ui`."""
    return f"sqlite:///{(run_dir.resolve().parent / 'mlflow.db').as_posix()}"


class MlflowStore:
    """A tracking store, opened (and checked) at the start of a run."""

    def __init__(self, uri: str):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as missing:
            raise MergerError(f"tracking: mlflow is not installed ({INSTALL})") from missing
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.client.search_experiments(max_results=1)
        except Exception as error:  # any failure to open the store: one line, before weights load
            raise MergerError(f"tracking: cannot open the MLflow store {uri!r}: {first_line(error)}") from error

    def experiment(self, name: str) -> str:
        """The id of experiment `name`, created when missing (artifacts beside a SQLite store, else MLflow
        would put them under the working directory)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):
            artifacts = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def reopen(self, run_id: str) -> bool:
        """Whether the store holds run `run_id`; it is set running again."""
        from mlflow.exceptions import MlflowException

        try:
            status = self.client.get_run(run_id).info.status
        except MlflowException:
            return False
        if status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return True

    def create_run(self, experiment: str, run_dir: Path) -> str:
        tags = {RUN_DIR_TAG: str(run_dir.resolve())}
        return self.client.create_run(self.experiment(experiment), run_name=run_dir.name, tags=tags).info.run_id

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        return {metric.step for metric in self.client.get_metric_history(run_id, key)}

    def log(
        self,
        run_id: str,
        metrics: list[tuple[str, float, int]] = (),  # type: ignore[assignment]
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """One batch, written at once (a kill leaves all of it or none)."""
        import time

        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), now, step) for key, value, step in metrics],
            params=[Param(key, value) for key, value in (params or {}).items()],
            tags=[RunTag(key, value) for key, value in (tags or {}).items()],
        )

    def logged(self, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """The run's params and tags so far."""
        data = self.client.get_run(run_id).data
        return dict(data.params), dict(data.tags)

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str, finished: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if finished else "KILLED")
