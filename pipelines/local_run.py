"""``e3prune run``: the whole pipeline on this machine, through ``kfp.local``'s subprocess runner.

The same compiled components as on Kubeflow run as subprocesses of this Python (no containers,
no venv per step: the steps import the installed package). Defaults: the shipped reference
model, step data and the exported model under ``<output>/storage``, MLflow tracking in
``<output>/mlflow.db`` with artifacts in ``<output>/mlartifacts``, KFP's outputs under
``<output>/kfp``. Give ``--storage-prefix s3://…`` and ``--mlflow-tracking-uri http://…`` to
use real servers (endpoint and credentials from the environment, as in a pod).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from e3prune.run_config import RunConfig

log = logging.getLogger(__name__)


def default_tracking_uri(output: Path) -> str:
    return f"sqlite:///{(output / 'mlflow.db').resolve()}"


def prepare_tracking(uri: str, experiment: str, output: Path) -> None:
    """For a local sqlite store, create the experiment with its artifacts beside the database.

    (Without this MLflow would put artifacts in ``./mlruns`` of whatever directory the step ran in.)
    """
    if not uri.startswith("sqlite:"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=(output / "mlartifacts").resolve().as_uri())


def run_summary(run_dir: Path) -> str:
    """What the run did: register's summary and promote's decision, or why it skipped."""
    parts = []
    for task, output in (("register", "summary"), ("promote", "decision")):
        path = run_dir / task / output
        if path.is_file():
            parts.append(path.read_text())
    if not parts:  # detect-release found nothing new: its plan says which version holds the release
        parts.append((run_dir / "detect-release" / "plan").read_text())
    return "\n".join(parts)


def run_local(params: dict[str, Any], output: str | os.PathLike = "runs/e3-pruner") -> dict[str, Any]:
    """Validate ``params`` (pipeline parameter names), run the pipeline, return where things are."""
    out = Path(output).expanduser().resolve()
    settings = dict(params)
    settings.setdefault("storage_prefix", str(out / "storage"))
    tracking = settings.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out)
    settings["mlflow_tracking_uri"] = tracking
    cfg = RunConfig.parse(settings)
    cfg.check()  # every parameter before anything starts; the pipeline's first step checks again
    out.mkdir(parents=True, exist_ok=True)
    prepare_tracking(tracking, cfg.mlflow_experiment, out)

    import warnings

    from kfp import local

    # Said once per step by kfp.local; both are the point of a local run: resources are ignored,
    # and the steps run this Python (which has the image's package installed) instead of the image.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")

    from e3prune_pipelines.e3_pruner.pipeline import PIPELINE_NAME, e3_pruner_pipeline

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(out / "kfp"),
        raise_on_error=True,
    )
    started = time.time()
    before = set((out / "kfp").glob(f"{PIPELINE_NAME}-*"))
    e3_pruner_pipeline(**cfg.model_dump())
    (run_dir,) = set((out / "kfp").glob(f"{PIPELINE_NAME}-*")) - before
    return {
        "summary": run_summary(run_dir),
        "run_dir": str(run_dir),
        "seconds": time.time() - started,
        "output": str(out),
        "kfp_outputs": str(out / "kfp"),
        "tracking_uri": tracking,
        "storage_prefix": cfg.storage_prefix,
    }
