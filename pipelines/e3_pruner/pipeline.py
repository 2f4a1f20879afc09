"""The e3-pruner pipeline: source model → sampled data → teacher top-K cache → mask search →
hardened checkpoint → distillation → evaluation → export → MLflow registration.

Compile with ``e3prune compile`` (or ``python -m e3prune_pipelines.e3_pruner.pipeline``); the
committed ``pipeline.yaml`` beside this file is what you upload in the Kubeflow UI, and a test
fails when it drifts from a fresh compile.

The pipeline's parameters are not written here: its signature and their descriptions are derived
from :class:`e3prune.run_config.RunConfig`, i.e. from the step configs where each parameter is
declared once. ``detect_release`` validates them all and hands each step its parameters.

Cluster settings that are not run parameters are fixed at compile time, in one place each:
- the image: ``components/image.py`` (``E3PRUNE_IMAGE``);
- resources per step: :data:`RESOURCES` (kfp.local ignores them);
- credentials: every step gets ``AWS_*`` from the Secret :data:`S3_SECRET` and endpoints
  (``AWS_ENDPOINT_URL``, ``MLFLOW_TRACKING_URI``) from the ConfigMap :data:`ENV_CONFIG_MAP`, both
  optional, both created by the Helm chart (``charts/e3-pruner``). Credentials are never
  pipeline parameters.
"""

import inspect
from dataclasses import dataclass

from kfp import dsl, kubernetes
from kfp.dsl import pipeline_channel

from e3prune.run_config import RunConfig

from e3prune_components.detect_release.component import detect_release
from e3prune_components.distill.component import distill
from e3prune_components.evaluate.component import evaluate
from e3prune_components.export.component import export
from e3prune_components.harden_mask.component import harden_mask
from e3prune_components.promote.component import promote
from e3prune_components.register.component import register
from e3prune_components.sample_data.component import sample_data
from e3prune_components.search_mask.component import search_mask
from e3prune_components.teacher_logits.component import teacher_logits

PIPELINE_NAME = "e3-pruner"
S3_SECRET = "e3-pruner-s3"  # credentials: SECRET_KEYS, each optional
ENV_CONFIG_MAP = "e3-pruner-env"  # keys AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, MLFLOW_TRACKING_URI
# S3 keys, a hub token for gated models, and MLflow's own credential variables: a tracking URI
# must not carry credentials (docs/operations.md, "Credentials and endpoints").
SECRET_KEYS = {
    k: k
    for k in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    )
}
CONFIG_KEYS = {k: k for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "HF_ENDPOINT")}

# Requests and limits per step for the default (CPU) build; a GPU cluster compiles its own
# (docs/operations.md lists what each step needs for 8B and 32B models).
RESOURCES: dict[str, dict[str, str]] = {
    "detect-release": {"cpu_request": "500m", "memory_request": "2Gi", "memory_limit": "4Gi"},
    "sample-data": {"cpu_request": "2", "memory_request": "4Gi", "memory_limit": "16Gi"},
    "teacher-logits": {"cpu_request": "4", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "search-mask": {"cpu_request": "4", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "harden-mask": {"cpu_request": "2", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "distill": {"cpu_request": "4", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "evaluate": {"cpu_request": "4", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "export": {"cpu_request": "1", "memory_request": "2Gi", "memory_limit": "8Gi"},
    "register": {"cpu_request": "500m", "memory_request": "1Gi", "memory_limit": "4Gi"},
    "promote": {"cpu_request": "250m", "memory_request": "512Mi", "memory_limit": "2Gi"},
}
STEPS = tuple(RESOURCES)  # the task names, in the order they run
# Steps that talk to the network (hub, S3, MLflow): retried with backoff; the others fail fast.
# detect-release is not: it mostly fails on a bad parameter, where a retry only delays the
# message, and it is cheap to run again (a schedule does, the next time).
NETWORK_RETRIES = {"sample-data": 2, "export": 3, "register": 3, "promote": 3}


def _configure(task: dsl.PipelineTask, name: str, cache: bool = True) -> dsl.PipelineTask:
    task.set_display_name(name)
    spec = RESOURCES[name]
    if "cpu_request" in spec:
        task.set_cpu_request(spec["cpu_request"])
    if "memory_request" in spec:
        task.set_memory_request(spec["memory_request"])
    if "memory_limit" in spec:
        task.set_memory_limit(spec["memory_limit"])
    if "accelerator_type" in spec:
        task.set_accelerator_type(spec["accelerator_type"]).set_accelerator_limit(spec.get("accelerator_limit", "1"))
    if name in NETWORK_RETRIES:
        task.set_retry(num_retries=NETWORK_RETRIES[name], backoff_duration="30s", backoff_factor=2.0)
    if not cache:
        task.set_caching_options(enable_caching=False)
    kubernetes.use_secret_as_env(task, S3_SECRET, SECRET_KEYS, optional=True)
    kubernetes.use_config_map_as_env(task, ENV_CONFIG_MAP, CONFIG_KEYS, optional=True)
    return task


@dataclass(frozen=True)
class RunChannels:
    """The run-level pipeline parameters the steps after detect-release read directly."""

    storage_prefix: pipeline_channel.PipelineParameterChannel
    registered_model_name: pipeline_channel.PipelineParameterChannel
    mlflow_tracking_uri: pipeline_channel.PipelineParameterChannel


def _compress(release: dsl.PipelineTask, run: RunChannels) -> None:
    """The steps after detect-release, inside its condition: every step reads the concrete release
    and its parameters as detect-release validated them (``<step>_params``)."""
    source = release.outputs["source_uri"]
    revision = release.outputs["source_revision_resolved"]
    step = {name: release.outputs[f"{name}_params"] for name in ("sample", "teacher", "search", "distill", "evaluate")}
    model = {"source_model": source, "source_revision": revision, "storage_prefix": run.storage_prefix}
    data = _configure(sample_data(**model, params=step["sample"]), "sample-data")
    cache = _configure(teacher_logits(**model, data=data.outputs["data"], params=step["teacher"]), "teacher-logits")
    search = _configure(
        search_mask(**model, teacher_cache=cache.outputs["cache"], params=step["search"]), "search-mask"
    )
    pruned = _configure(harden_mask(**model, search=search.outputs["search"]), "harden-mask")
    student = _configure(
        distill(
            model=pruned.outputs["model"],
            teacher_cache=cache.outputs["cache"],
            storage_prefix=run.storage_prefix,
            params=step["distill"],
        ),
        "distill",
    )
    evaluation = _configure(
        evaluate(
            **model,
            pruned=pruned.outputs["model"],
            distilled=student.outputs["distilled"],
            data=data.outputs["data"],
            params=step["evaluate"],
        ),
        "evaluate",
    )
    _publish(release, search, student, evaluation, run)


def _publish(release, search, student, evaluation, run: RunChannels) -> None:
    """Export, register and promote: side effects per run, never served from Kubeflow's cache."""
    exported = _configure(
        export(
            distilled=student.outputs["distilled"],
            evaluation=evaluation.outputs["evaluation"],
            storage_prefix=run.storage_prefix,
            registered_model_name=run.registered_model_name,
            source_model=release.outputs["source_uri"],
            source_revision=release.outputs["source_revision_resolved"],
            run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "export",
        cache=False,  # publishes to a per-run location
    )
    registered = _configure(
        register(
            run_config=release.outputs["run_config"],
            search=search.outputs["search"],
            distilled=student.outputs["distilled"],
            evaluation=evaluation.outputs["evaluation"],
            exported=exported.outputs["exported"],
            run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            mlflow_tracking_uri=run.mlflow_tracking_uri,
        ),
        "register",
        cache=False,  # a side effect in MLflow, idempotent per run
    )
    _configure(
        promote(
            registered_model_name=registered.outputs["model_name"],
            version=registered.outputs["version"],
            params=release.outputs["gate_params"],
            mlflow_tracking_uri=run.mlflow_tracking_uri,
        ),
        "promote",
        cache=False,  # reads and moves aliases
    )


def _signature() -> inspect.Signature:
    """The pipeline's parameters: every field of RunConfig, with its default and KFP type."""
    from e3prune_components.detect_release.generate import kfp_type

    return inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=kfp_type(f.annotation))
            for name, f in RunConfig.model_fields.items()
        ]
    )


def _docstring() -> str:
    from e3prune_components.detect_release.generate import sentence

    args = "\n".join(f"    {name}: {sentence(f.description)}" for name, f in RunConfig.model_fields.items())
    return (
        "Compresses a causal LM by removing whole decoder layers (E³-Pruner) and registers it in MLflow.\n\n"
        f"Args:\n{args}\n"
    )


def _pipeline(*args, **kwargs):
    params = _signature().bind(*args, **kwargs).arguments  # KFP passes every parameter, by position
    release = _configure(detect_release(**params), "detect-release", cache=False)  # resolves moving revisions
    run = RunChannels(params["storage_prefix"], params["registered_model_name"], params["mlflow_tracking_uri"])
    with dsl.If(release.outputs["Output"] == "compress", name="new-release"):
        _compress(release, run)
    with dsl.If(release.outputs["Output"] == "gate", name="pending-gate"):
        # Registered by an earlier run whose gate never ran (killed or failed promote): the gate alone.
        _configure(
            promote(
                registered_model_name=run.registered_model_name,
                version=release.outputs["pending_gate_version"],
                params=release.outputs["gate_params"],
                mlflow_tracking_uri=run.mlflow_tracking_uri,
            ),
            "promote",
            cache=False,
        )


_pipeline.__name__ = _pipeline.__qualname__ = "e3_pruner_pipeline"
_pipeline.__signature__ = _signature()
_pipeline.__doc__ = _docstring()
e3_pruner_pipeline = dsl.pipeline(name=PIPELINE_NAME)(_pipeline)


if __name__ == "__main__":
    from e3prune_pipelines.compile import main

    main()
