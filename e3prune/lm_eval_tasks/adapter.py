"""lm-evaluation-harness on models already in memory (docs/method.md, Stage 6).

The task names are checked before any weights are loaded (:func:`check_lm_eval_tasks`, which
also returns the TaskManager to run them with); :func:`run_lm_eval` then scores each model
through lm-eval's Python API. lm-eval is an optional dependency: ``pip install 'e3-pruner[eval]'``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from e3prune.errors import E3PruneError
from e3prune.lm_eval_tasks import SHIPPED_TASKS, TASK_DIR

log = logging.getLogger(__name__)

# lm-eval's stderr of a mean is closed-form; bootstrapping is for other aggregations, where the
# default 100 000 resamples cost more than a small evaluation itself.
LM_EVAL_BOOTSTRAP_ITERS = 1000


def _task_manager(tasks: Sequence[str]):
    """lm-eval's TaskManager with the shipped tasks on its include path.

    lm-eval's own ~15 000 task configs are indexed only when a task outside the shipped ones is
    asked for: indexing them takes seconds, the shipped directory milliseconds.
    """
    from lm_eval.tasks import TaskManager

    defaults = any(t not in SHIPPED_TASKS for t in tasks)
    return TaskManager(include_path=str(TASK_DIR), include_defaults=defaults)


def check_lm_eval_tasks(tasks: Sequence[str]):
    """The TaskManager that knows every task in ``tasks``, or an error that lists what there is."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise E3PruneError(
            "lm-evaluation-harness is not installed; install it with pip install 'e3-pruner[eval]' "
            "or leave lm_eval_tasks empty",
            field="lm_eval_tasks",
        ) from None
    manager = _task_manager(tasks)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, sorted(known), n=3)
            if close:
                hints.append(f"{t!r}: did you mean {', '.join(close)}?")
        raise E3PruneError(
            f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}. Shipped with e3prune: "
            f"{', '.join(SHIPPED_TASKS)}; lm-eval's own tasks (groups and tags included, "
            f"{len(known) - len(SHIPPED_TASKS):,}) are listed by `lm-eval ls tasks`."
            + (" " + " ".join(hints) if hints else ""),
            field="lm_eval_tasks",
        )
    return manager


def _task_scores(results: Mapping[str, Any], task: str) -> dict[str, Any]:
    """One task's metrics from ``simple_evaluate``'s results, with the number of items scored."""
    metrics: dict[str, Any] = {}
    for key, value in results["results"][task].items():
        name, sep, filt = key.partition(",")
        if not sep:
            continue  # alias, name, sample_len: labels, not metrics
        metrics[name if filt == "none" else key] = float(value) if isinstance(value, int | float) else None
    samples = results.get("n-samples", {}).get(task, {}).get("effective")
    metrics["samples"] = int(samples) if samples is not None else None
    return metrics


def run_lm_eval(
    models: Mapping[str, Any],
    tokenizer: Any,
    tasks: Sequence[str],
    task_manager: Any,
    limit: int | None,
    batch_size: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {role: {metric: value, "samples": n}}}`` from lm-eval's Python API on loaded models.

    ``models`` maps a role to a transformers causal LM. Metric names drop lm-eval's ``,none``
    filter suffix (other filters keep theirs); a stderr that lm-eval could not compute ("N/A")
    is null.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for role, model in models.items():
        log.info("lm-eval %s on the %s model", ", ".join(tasks), role)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=task_manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=LM_EVAL_BOOTSTRAP_ITERS,
        )
        for task in results["results"]:
            out.setdefault(task, {})[role] = _task_scores(results, task)
    return out
