"""``e3prune run``: the whole pipeline on this machine, through ``kfp.local``'s subprocess runner.

The same compiled components as on Kubeflow run as subprocesses of this Python (no containers,
no venv per step: the steps import the installed package). Defaults: the shipped reference
model, step data and the exported model under ``<output>/storage``, MLflow tracking in
``<output>/mlflow.db`` with artifacts in ``<output>/mlartifacts``, KFP's outputs under
``<output>/kfp/<run id>``. Give ``--storage-prefix s3://…`` and ``--mlflow-tracking-uri http://…``
to use real servers (endpoint and credentials from the environment, as in a pod).

One run at a time per output directory (a lock; a second run is refused, naming the first). A run
stopped with SIGINT or SIGTERM stops its running step too. A run killed outright and started again
reuses every step that completed (the work locations are keyed by each step's inputs, see
``components/locations.py``) and resumes an interrupted search or distillation.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from e3prune.errors import E3PruneError
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
    for task, output in (("register", "summary"), ("promote*", "decision")):  # promote-2: the gate-only branch
        parts += [path.read_text() for path in sorted(run_dir.glob(f"{task}/{output}")) if path.is_file()]
    if not (run_dir / "register").is_dir():  # nothing compressed: the plan says why, or which gate ran
        parts.insert(0, (run_dir / "detect-release" / "plan").read_text())
    return "\n".join(parts)


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/.run.lock`` for the run; a second run on the same directory is refused at once."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".run.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise E3PruneError(
                f"{out} is in use by another e3prune run ({holder}); wait for it to finish or give another --output",
                field="output",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


def stop_step_processes(grace_seconds: float = 10.0) -> None:
    """Terminate the steps kfp.local started (our child processes), then kill what is left."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_seconds)
    for child in alive:
        child.kill()


@contextmanager
def steps_stop_with_us() -> Iterator[None]:
    """On SIGINT or SIGTERM, stop the running step before this process exits."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def stop(signum, frame):
        stop_step_processes()
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_local(params: dict[str, Any], output: str | os.PathLike = "runs/e3-pruner") -> dict[str, Any]:
    """Validate ``params`` (pipeline parameter names), run the pipeline, return where things are."""
    out = Path(output).expanduser().resolve()
    settings = dict(params)
    settings.setdefault("storage_prefix", str(out / "storage"))
    tracking = settings.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out)
    settings["mlflow_tracking_uri"] = tracking
    cfg = RunConfig.parse(settings)
    cfg.check()  # every parameter before anything starts; the pipeline's first step checks again
    with run_lock(out), steps_stop_with_us():
        prepare_tracking(tracking, cfg.mlflow_experiment, out)
        result = _run(cfg, out)
    return {**result, "output": str(out), "tracking_uri": tracking, "storage_prefix": cfg.storage_prefix}


def _run(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """The pipeline through kfp.local, under its own pipeline root: the run's outputs are found by its id."""
    import warnings

    from kfp import local

    # Said once per step by kfp.local; both are the point of a local run: resources are ignored,
    # and the steps run this Python (which has the image's package installed) instead of the image.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")

    from e3prune_pipelines.e3_pruner.pipeline import PIPELINE_NAME, e3_pruner_pipeline

    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    root = out / "kfp" / run_id
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    started = time.time()
    e3_pruner_pipeline(**cfg.model_dump())
    (run_dir,) = root.glob(f"{PIPELINE_NAME}-*")  # this run's pipeline root holds this run only
    return {"summary": run_summary(run_dir), "run_dir": str(run_dir), "seconds": time.time() - started,
            "kfp_outputs": str(root)}  # fmt: skip
