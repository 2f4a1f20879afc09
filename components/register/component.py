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
    mlflow_tracking_uri: str,
) -> NamedTuple("Registered", model_name=str, version=str, run_id=str):
    """Logs the run to MLflow and registers the exported model with alias challenger.

    One MLflow run per pipeline run (found again by its run key, so re-running only this step
    after a failure reuses it): every parameter, the search and distillation curves per step, the
    final metrics, the mask plot, metrics table and pruning.json. The exported checkpoint becomes
    the run's MLflow logged model (external: its weights stay where export wrote them) with the
    final metrics, and a new version of the registered model is created from it, tagged with
    source, revision, kept layers, ratio and metrics, with the alias challenger; champion moves
    only through the promotion gate. The tracking URI comes from mlflow_tracking_uri, else the
    run's parameters, else the pod's MLFLOW_TRACKING_URI. `e3prune register` does the same.

    Args:
        run_config: Output of detect_release (all parameters and the release).
        search: Output of search_mask.
        distilled: Output of distill (its per-step metrics).
        evaluation: Output of evaluate.
        exported: Output of export; must be complete.
        run_key: The pipeline run's id (idempotency key).
        run_name: The pipeline run's name (MLflow run name).
        summary: What was registered, where, and the headline numbers.
        mlflow_tracking_uri: Overrides $MLFLOW_TRACKING_URI; empty: the run's parameter, else the pod's.

    Returns:
        model_name: The registered model.
        version: The new version.
        run_id: The MLflow run.
    """
    import json
    import logging
    from collections import namedtuple

    from e3prune.registration import register_run
    from e3prune_components.locations import input_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = register_run(
        run_config=run_config.path,
        search=input_uri(search),
        distilled=input_uri(distilled),
        evaluation=input_uri(evaluation),
        exported=input_uri(exported),
        run_key=run_key,
        run_name=run_name,
        tracking_uri=mlflow_tracking_uri or None,
    )
    with open(summary.path, "w") as fh:
        fh.write(result["summary_markdown"])
    print(json.dumps({k: str(v) for k, v in result.items() if k != "summary_markdown"}))
    return namedtuple("Registered", ["model_name", "version", "run_id"])(
        result["model_name"], str(result["version"]), result["run_id"]
    )
