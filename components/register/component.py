"""register: track the run in MLflow and register the exported model as a new version."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    run_config: Input[Artifact],
    search: Input[Artifact],
    distilled: Input[Model],
    evaluation: Input[Artifact],
    exported: Input[Model],
    run_key: str,
    run_name: str,
    summary: Output[Markdown],
    mlflow_tracking_uri: str = "",
) -> NamedTuple("Registered", model_name=str, version=str, run_id=str):
    """Logs the run to MLflow and registers the exported model with alias challenger.

    One MLflow run per pipeline run (found again by its run key, so re-running only this step
    after a failure reuses it): every parameter, the search and distillation curves per step, the
    final metrics, the mask plot, metrics table and pruning.json. The exported model becomes a new
    version of the registered model, tagged with source, revision, kept layers, ratio and metrics,
    and gets the alias challenger; champion moves only through the promotion gate. The tracking
    URI comes from mlflow_tracking_uri or the pod's MLFLOW_TRACKING_URI.

    Args:
        run_config: Output of detect_release (all parameters and the release).
        search: Output of search_mask.
        distilled: Output of distill (its per-step metrics).
        evaluation: Output of evaluate.
        exported: Output of export; must be complete.
        run_key: The pipeline run's id (idempotency key).
        run_name: The pipeline run's name (MLflow run name).
        summary: What was registered, where, and the headline numbers.
        mlflow_tracking_uri: Overrides $MLFLOW_TRACKING_URI.

    Returns:
        model_name: The registered model.
        version: The new version.
        run_id: The MLflow run.
    """
    import json
    import logging
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from e3prune import releases, storage
    from e3prune.registry import RegisterConfig, register
    from e3prune.report import flat_metrics, read_trajectory, run_summary, search_plot_png
    from e3prune_components.locations import input_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = json.loads(Path(run_config.path).read_text())
    model_uri = input_uri(exported)
    # One file each, not whole checkpoints; reading the export's refuses one without its marker.
    pruning = storage.read_file(model_uri, "pruning.json", field="exported")
    search_dir = storage.input_dir(input_uri(search), field="search")
    found = json.loads((search_dir / "search.json").read_text())
    trajectory = read_trajectory(search_dir)
    distill_log = storage.read_file(input_uri(distilled), "metrics.jsonl", field="distilled").decode()
    distill_rows = [json.loads(x) for x in distill_log.splitlines() if x.strip()]
    eval_dir = storage.input_dir(input_uri(evaluation), field="evaluation")
    flat = flat_metrics(json.loads((eval_dir / "metrics.json").read_text()))

    curves = {f"search/{k}": [(r["step"], float(r[k])) for r in trajectory] for k in ("loss", "tau", "k")}
    for key in ("loss", "kl", "ce", "entropy", "lr", "grad_norm"):
        points = [(r["step"], float(r[key])) for r in distill_rows if r.get(key) is not None]
        if points:
            curves[f"distill/{key}"] = points
    staging = Path(tempfile.mkdtemp(prefix="e3prune-register-"))
    (staging / "search.png").write_bytes(search_plot_png(found, trajectory))
    (staging / "pruning.json").write_bytes(pruning)
    artifacts = {
        "plots/search.png": staging / "search.png",
        "evaluation/metrics.json": eval_dir / "metrics.json",
        "evaluation/summary.md": eval_dir / "summary.md",
        "pruning.json": staging / "pruning.json",
        "search/search.json": search_dir / "search.json",
        "run_config.json": Path(run_config.path),
    }
    L = int(found["num_hidden_layers"])
    tags = {
        "e3prune.source_uri": params["source_uri"],
        "e3prune.kept_layers": ",".join(map(str, found["keep"])),
        "e3prune.removed_layers": ",".join(map(str, found["removed"])),
        "e3prune.remove_ratio": f"{len(found['removed']) / L:.4f}",
        "e3prune.num_hidden_layers": str(L - len(found["removed"])),
        "e3prune.gate.max_perplexity_ratio": str(params["gate_max_perplexity_ratio"]),
        "e3prune.gate.min_speedup": str(params["gate_min_speedup"]),
    }
    result = register(
        RegisterConfig.parse(
            model_name=params["registered_model_name"],
            model_uri=model_uri,
            run_key=run_key,
            run_name=run_name,
            experiment=params["mlflow_experiment"],
            tracking_uri=mlflow_tracking_uri or params.get("mlflow_tracking_uri") or None,
            # source, revision and ratio: one version per release, even when two runs race on it
            release_tags=releases.release_tags(
                releases.Release(params["source_model"], params["source_uri"], params["resolved_revision"]),
                params["remove_ratio"],
            ),
        ),
        params={k: str(v) for k, v in params.items()},
        metrics=flat,
        curves=curves,
        artifacts=artifacts,
        tags=tags,
    )
    with open(summary.path, "w") as fh:
        fh.write(run_summary(flat, found["keep"], L, model_uri, result))
    print(json.dumps({k: str(v) for k, v in result.items()}))
    return namedtuple("Registered", ["model_name", "version", "run_id"])(
        result["model_name"], str(result["version"]), result["run_id"]
    )
