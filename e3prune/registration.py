"""Register one pipeline run from its step outputs: what the ``register`` step and ``e3prune register`` do.

:func:`register_run` reads what the earlier steps wrote — the run's parameters
(``run_config.json`` of ``detect_release``), the search (``search.json``, its trajectory), the
distillation's per-step metrics, the evaluation (``metrics.json``, ``summary.md``) and the
export's ``pruning.json`` — and hands them to :func:`e3prune.registry.register`: every parameter,
the search and distillation curves per step, the final metrics, the mask plot, the metrics table
and ``pruning.json``, with version tags for the source, the kept layers and the ratio (and, when
the evaluate step did not trust its speed measurement, the reason: ``e3prune.speed.unreliable_reason``,
which the promotion gate quotes). Only single
files are read from the export (never the checkpoint), and an export without its completion
marker is refused before MLflow is contacted.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from e3prune import releases, storage
from e3prune.registry import RegisterConfig, register
from e3prune.report import flat_metrics, read_trajectory, run_summary, search_plot_png, speed_tags

STAGING_PREFIX = "e3prune-register-"  # the temporary directory of the plot and pruning.json
DISTILL_CURVES = ("loss", "kl", "ce", "entropy", "lr", "grad_norm")
SEARCH_CURVES = ("loss", "tau", "k")


def register_run(
    *,
    run_config: str | Path,
    search: str,
    distilled: str,
    evaluation: str,
    exported: str,
    run_key: str,
    run_name: str,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Log the run to MLflow and register its exported model with alias ``challenger``.

    ``run_config`` is the local ``run_config.json``; the others are the step outputs' URIs (a
    directory or ``s3://…``). ``tracking_uri`` (else the run's ``mlflow_tracking_uri``, else
    ``MLFLOW_TRACKING_URI``) names the server. Rerunning with the same ``run_key`` reuses the run,
    the logged model and the version. Returns :func:`e3prune.registry.register`'s result with
    ``summary_markdown`` (what was registered, where, and the headline numbers) added.
    """
    params = json.loads(Path(run_config).read_text())
    # One file each, not whole checkpoints; reading the export's refuses one without its marker.
    pruning = storage.read_file(exported, "pruning.json", field="exported")
    search_dir = storage.input_dir(search, field="search")
    found = json.loads((search_dir / "search.json").read_text())
    trajectory = read_trajectory(search_dir)
    eval_dir = storage.input_dir(evaluation, field="evaluation")
    evaluation_metrics = json.loads((eval_dir / "metrics.json").read_text())
    flat = flat_metrics(evaluation_metrics)
    curves = _curves(trajectory, _distill_rows(distilled))
    cfg = _config(params, exported, run_key, run_name, tracking_uri)
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX) as tmp:
        staging = Path(tmp)
        (staging / "search.png").write_bytes(search_plot_png(found, trajectory))
        (staging / "pruning.json").write_bytes(pruning)
        artifacts = {
            "plots/search.png": staging / "search.png",
            "evaluation/metrics.json": eval_dir / "metrics.json",
            "evaluation/summary.md": eval_dir / "summary.md",
            "pruning.json": staging / "pruning.json",
            "search/search.json": search_dir / "search.json",
            "run_config.json": Path(run_config),
        }
        params_text = {k: str(v) for k, v in params.items()}
        tags = {**_tags(params, found), **speed_tags(evaluation_metrics)}
        result = register(cfg, params=params_text, metrics=flat, curves=curves, artifacts=artifacts, tags=tags)
    num_layers = int(found["num_hidden_layers"])
    return {**result, "summary_markdown": run_summary(flat, found["keep"], num_layers, exported, result)}


def _distill_rows(distilled: str) -> list[dict[str, Any]]:
    text = storage.read_file(distilled, "metrics.jsonl", field="distilled").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _curves(trajectory: list[dict[str, Any]], distill_rows: list[dict[str, Any]]) -> dict[str, list]:
    """``search/<key>`` and ``distill/<key>`` metric histories by step (distill keys it logged only)."""
    curves = {f"search/{k}": [(r["step"], float(r[k])) for r in trajectory] for k in SEARCH_CURVES}
    for key in DISTILL_CURVES:
        points = [(r["step"], float(r[key])) for r in distill_rows if r.get(key) is not None]
        if points:
            curves[f"distill/{key}"] = points
    return curves


def _tags(params: dict[str, Any], found: dict[str, Any]) -> dict[str, str]:
    """Version tags: the source, the layers kept and removed, and the gate's thresholds of the run."""
    num_layers = int(found["num_hidden_layers"])
    return {
        "e3prune.source_uri": params["source_uri"],
        "e3prune.kept_layers": ",".join(map(str, found["keep"])),
        "e3prune.removed_layers": ",".join(map(str, found["removed"])),
        "e3prune.remove_ratio": f"{len(found['removed']) / num_layers:.4f}",
        "e3prune.num_hidden_layers": str(num_layers - len(found["removed"])),
        "e3prune.gate.max_perplexity_ratio": str(params["gate_max_perplexity_ratio"]),
        "e3prune.gate.min_speedup": str(params["gate_min_speedup"]),
    }


def _config(params: dict[str, Any], exported: str, run_key: str, run_name: str, tracking_uri: str | None):
    release = releases.Release(params["source_model"], params["source_uri"], params["resolved_revision"])
    return RegisterConfig.parse(
        model_name=params["registered_model_name"],
        model_uri=exported,
        run_key=run_key,
        run_name=run_name,
        experiment=params["mlflow_experiment"],
        tracking_uri=tracking_uri or params.get("mlflow_tracking_uri") or None,
        # source, revision and ratio: one version per release, even when two runs race on it
        release_tags=releases.release_tags(release, params["remove_ratio"]),
    )
