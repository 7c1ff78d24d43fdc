"""The one way into lm-eval: task managers, tasks loaded with anchored data files, evaluation, and the
language-model wrappers. Fitness scoring, the router's outcome table and benchmarks/zoo_headroom.py all
come through here; no other module imports `lm_eval`. What comes back is read by one rule, in
`merger.scoring.results`.

lm-eval is imported inside each function: importing it costs seconds, and commands that never score a
model (status, report, registry) must not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from merger.common.bundled import bundled_dir
from merger.common.stopping import check_stop

FEWSHOT_SEED = 1234  # lm-eval's own default fewshot seed (simple_evaluate's), fixed for every load


@cache
def _task_manager(include_paths: tuple[str, ...], with_builtins: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=with_builtins)


def task_manager_for(names: Sequence[str], include_paths: tuple[str, ...]) -> Any:
    """A TaskManager (one per process and path set) that knows every name; lm-eval's built-in tasks are
    indexed only when a name needs them (~9 s)."""
    local = _task_manager(include_paths, False)
    if all(name in local.all_tasks for name in names):
        return local
    return _task_manager(include_paths, True)


def _anchored_data_files(config: dict[str, Any], yaml_path: Path) -> dict[str, Any]:
    """A task config whose relative `data_files` point at real files wherever merger runs from.

    lm-eval reads relative data paths against the working directory; a path is tried next to the
    task's YAML, then against the root that holds the bundled `evals/` (installed or in a checkout).
    """
    files = config.get("dataset_kwargs", {}).get("data_files")
    if not isinstance(files, dict):
        return config
    anchored = {}
    for split, name in files.items():
        anchored[split] = name
        if isinstance(name, str) and not Path(name).is_absolute() and not Path(name).exists():
            for root in (yaml_path.parent, bundled_dir("evals").parent):
                if (root / name).exists():
                    anchored[split] = str((root / name).resolve())
                    break
    return {**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": anchored}}


def anchored_task_configs(manager: Any, names: Sequence[str]) -> list[Any]:
    """What to give lm-eval for `names`: local tasks as configs with anchored data files, others by name."""
    configs: list[Any] = []
    for name in names:
        entry = manager.task_index.get(name)
        is_local_task = entry is not None and entry.yaml_path is not None and entry.kind.name == "TASK"
        configs.append(_anchored_data_files(dict(entry.cfg), Path(entry.yaml_path)) if is_local_task else name)
    return configs


def load_tasks(
    names: Sequence[str], include_paths: tuple[str, ...], num_fewshot: int | None = None
) -> dict[str, Any]:
    """lm-eval's loaded tasks ({"tasks": ..., "groups": ...}) for `names`, as simple_evaluate prepares
    them: `num_fewshot` overrides every task that does not pin 0, unset means 0, and a fixed fewshot seed."""
    manager = task_manager_for(names, include_paths)
    loaded = manager.load(anchored_task_configs(manager, names))
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def evaluate_tasks(
    lm: Any,
    loaded: dict[str, Any],
    *,
    limit: int | None = None,
    samples: dict[str, list[int]] | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool | None = None,
) -> dict[str, Any]:
    """lm-eval's results for tasks from `load_tasks` (no bootstrap stderr: merger never reads it)."""
    from lm_eval.evaluator import evaluate

    output = evaluate(
        lm=lm,
        task_dict=loaded,
        limit=None if samples is not None else limit,
        samples=samples,
        bootstrap_iters=0,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn,
        verbosity="ERROR",
    )
    if output is None:
        raise RuntimeError("lm-eval returned no results")
    return output


def is_mean_aggregation(aggregation: Any) -> bool:
    """Whether a task's aggregation function is lm-eval's per-item mean."""
    from lm_eval.api.metrics import mean

    return aggregation is mean


@cache
def _hflm_classes() -> tuple[type, type]:
    """HFLM without per-request progress bars, and the same scoring teacher-forced requests with the output
    head only at the answer's positions (`merger.scoring.answer_logits`)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from merger.scoring.answer_logits import answer_lengths, answer_logits, answer_spans, body_and_head

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm=True):  # type: ignore[no-untyped-def]
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=True):  # type: ignore[no-untyped-def]
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=True):  # type: ignore[no-untyped-def]
            return super().generate_until(requests, disable_tqdm=True)

        # every batch goes through one of these two: a stop asked for ends the scoring between batches
        def _model_call(self, inps, attn_mask=None, labels=None):  # type: ignore[no-untyped-def]
            check_stop()
            return super()._model_call(inps, attn_mask, labels)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):  # type: ignore[no-untyped-def]
            check_stop()
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    class AnswerLogitsHFLM(QuietHFLM):
        """lm-eval batches and reads the logits as ever; `_model_call` knows which inputs it may see
        (set for the duration of `_loglikelihood_tokens`) and returns only their answers' window."""

        _answer_lengths: dict[tuple[int, ...], int] | None = None  # input tokens -> longest answer on it

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):  # type: ignore[no-untyped-def]
            if self.backend == "causal":
                self._answer_lengths = answer_lengths(requests, self.max_length)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            finally:
                self._answer_lengths = None

        def _model_call(self, inps, attn_mask=None, labels=None):  # type: ignore[no-untyped-def]
            check_stop()
            parts = body_and_head(self.model)
            if self._answer_lengths is None or attn_mask is not None or parts is None:
                return super()._model_call(inps, attn_mask, labels)
            spans = [answer_spans(row, self._answer_lengths) for row in inps.tolist()]
            if not all(spans):  # an input it was not told of (e.g. batch-size detection)
                return super()._model_call(inps, attn_mask, labels)
            precision = self.mixed_precision_dtype
            with (
                torch.no_grad(),
                torch.autocast(device_type=self.device.type, dtype=precision, enabled=precision is not None),
            ):
                return answer_logits(*parts, inps, spans)

    return QuietHFLM, AnswerLogitsHFLM


def quiet_lm(
    pretrained: Any,
    tokenizer: Any = None,
    batch_size: int = 1,
    device: str | None = None,
    answer_logits_only: bool = True,
) -> Any:
    """lm-eval's HFLM on a model object (or a checkpoint path), without its per-request progress bars;
    teacher-forced requests get logits only at their answers' positions unless `answer_logits_only` is off
    (or the model's structure is not known to allow it)."""
    quiet, answer_only = _hflm_classes()
    options: dict[str, Any] = {"pretrained": pretrained, "batch_size": batch_size}
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    if device is not None:
        options["device"] = device
    return (answer_only if answer_logits_only else quiet)(**options)


def chat_completions_lm(base_url: str, model: str, api_key: str = "") -> Any:
    """lm-eval's client for an OpenAI-compatible chat-completions endpoint (text in, text out)."""
    from lm_eval.models.openai_completions import LocalChatCompletion

    return LocalChatCompletion(
        base_url=f"{base_url}/chat/completions",
        model=model,
        tokenized_requests=False,
        tokenizer_backend=None,
        header={"Authorization": f"Bearer {api_key}"} if api_key else None,
        max_retries=1,
    )
