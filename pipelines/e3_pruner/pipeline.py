"""The e3-pruner pipeline: source model → sampled data → teacher top-K cache (fanned out, joined) → mask search →
hardened checkpoint → distillation → evaluation → export → MLflow registration.

Compile with ``e3prune compile`` (or ``python -m e3prune_pipelines.e3_pruner.pipeline``); the
committed ``pipeline.yaml`` beside this file is what you upload in the Kubeflow UI, and a test
fails when it drifts from a fresh compile.

The pipeline's parameters are not written here: its signature and their descriptions are derived
from :class:`e3prune.run_config.RunConfig`, i.e. from the step configs where each parameter is
declared once. ``detect_release`` validates them all and hands each step its parameters.

Cluster settings that are not run parameters are fixed at compile time, in
``pipelines/e3_pruner/cluster.py``: the image, resources, GPUs, node selection, and the Secret
and ConfigMap every step reads its credentials and endpoints from (never pipeline parameters).
:func:`make_pipeline` builds the pipeline for one :class:`~e3prune_pipelines.e3_pruner.cluster.Cluster`:
:data:`e3_pruner_pipeline` (CPU, ``pipeline.yaml``) and :data:`e3_pruner_gpu_pipeline` (GPU nodes,
``pipeline-gpu.yaml``).
"""

import inspect
from dataclasses import dataclass

from kfp import dsl
from kfp.dsl import pipeline_channel

from e3prune.run_config import RunConfig
from e3prune_components.detect_release.component import detect_release
from e3prune_components.distill.component import distill
from e3prune_components.evaluate.component import evaluate
from e3prune_components.export.component import export
from e3prune_components.harden_mask.component import harden_mask
from e3prune_components.join_teacher_cache.component import join_teacher_cache
from e3prune_components.promote.component import promote
from e3prune_components.register.component import register
from e3prune_components.sample_data.component import sample_data
from e3prune_components.search_mask.component import search_mask
from e3prune_components.teacher_logits.component import teacher_logits
from e3prune_pipelines.e3_pruner.cluster import CPU, GPU, STEPS, Cluster, configure

PIPELINE_NAME = "e3-pruner"
GPU_PIPELINE_NAME = "e3-pruner-gpu"
__all__ = ["STEPS", "e3_pruner_gpu_pipeline", "e3_pruner_pipeline", "make_pipeline"]


@dataclass(frozen=True)
class RunChannels:
    """The run-level pipeline parameters the steps after detect-release read directly."""

    storage_prefix: pipeline_channel.PipelineParameterChannel
    registered_model_name: pipeline_channel.PipelineParameterChannel
    mlflow_tracking_uri: pipeline_channel.PipelineParameterChannel


def _compress(release: dsl.PipelineTask, run: RunChannels, cluster: Cluster) -> None:
    """The steps after detect-release, inside its condition: every step reads the concrete release
    and its parameters as detect-release validated them (``<step>_params``)."""
    source = release.outputs["source_uri"]
    revision = release.outputs["source_revision_resolved"]
    step = {name: release.outputs[f"{name}_params"] for name in ("sample", "teacher", "search", "distill", "evaluate")}
    model = {"source_model": source, "source_revision": revision, "storage_prefix": run.storage_prefix}
    data = configure(sample_data(**model, params=step["sample"]), "sample-data", cluster)
    cache = _teacher_cache(release, data, model, step["teacher"], cluster)
    searched = search_mask(**model, teacher_cache=cache.outputs["cache"], params=step["search"])
    search = configure(searched, "search-mask", cluster)
    pruned = configure(harden_mask(**model, search=search.outputs["search"]), "harden-mask", cluster)
    student = distill(
        model=pruned.outputs["model"],
        teacher_cache=cache.outputs["cache"],
        storage_prefix=run.storage_prefix,
        params=step["distill"],
    )
    configure(student, "distill", cluster)
    evaluation = evaluate(
        **model,
        pruned=pruned.outputs["model"],
        distilled=student.outputs["distilled"],
        data=data.outputs["data"],
        params=step["evaluate"],
    )
    configure(evaluation, "evaluate", cluster)
    _publish(release, search, student, evaluation, run, cluster)


def _teacher_cache(release, data, model: dict, params, cluster: Cluster) -> dsl.PipelineTask:
    """The teacher pass fanned out over teacher_shards tasks, joined into the one cache later steps read.

    The task ids are an output of detect-release (``teacher_shard_ids``): the parameter's value is
    known only at run time, and ParallelFor over a task's output list is what both Kubeflow and
    kfp.local expand then. dsl.Collected hands the join the parts as one list of artifacts (in
    kfp.local in loop order; the join orders them by the part index each task recorded).
    """
    with dsl.ParallelFor(release.outputs["teacher_shard_ids"], name="teacher-shards") as shard:
        part = teacher_logits(**model, data=data.outputs["data"], params=params, shard_index=shard)
        configure(part, "teacher-logits", cluster)
    joined = join_teacher_cache(parts=dsl.Collected(part.outputs["cache"]), storage_prefix=model["storage_prefix"])
    return configure(joined, "join-teacher-cache", cluster)


def _publish(release, search, student, evaluation, run: RunChannels, cluster: Cluster) -> None:
    """Export, register and promote: side effects per run, never served from Kubeflow's cache."""
    exported = export(
        distilled=student.outputs["distilled"],
        evaluation=evaluation.outputs["evaluation"],
        storage_prefix=run.storage_prefix,
        registered_model_name=run.registered_model_name,
        source_model=release.outputs["source_uri"],
        source_revision=release.outputs["source_revision_resolved"],
        run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    )
    configure(exported, "export", cluster, cache=False)  # publishes to a per-run location
    registered = register(
        run_config=release.outputs["run_config"],
        search=search.outputs["search"],
        distilled=student.outputs["distilled"],
        evaluation=evaluation.outputs["evaluation"],
        exported=exported.outputs["exported"],
        run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        mlflow_tracking_uri=run.mlflow_tracking_uri,
    )
    configure(registered, "register", cluster, cache=False)  # a side effect in MLflow, idempotent per run
    gate = promote(
        registered_model_name=registered.outputs["model_name"],
        version=registered.outputs["version"],
        params=release.outputs["gate_params"],
        mlflow_tracking_uri=run.mlflow_tracking_uri,
    )
    configure(gate, "promote", cluster, cache=False)  # reads and moves aliases


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


def make_pipeline(cluster: Cluster, name: str = PIPELINE_NAME):
    """The pipeline for ``cluster``: same parameters and steps, other images, resources and placement."""

    def pipeline(*args, **kwargs):
        params = _signature().bind(*args, **kwargs).arguments  # KFP passes every parameter, by position
        release = configure(detect_release(**params), "detect-release", cluster, cache=False)  # moving revisions
        run = RunChannels(params["storage_prefix"], params["registered_model_name"], params["mlflow_tracking_uri"])
        with dsl.If(release.outputs["Output"] == "compress", name="new-release"):
            _compress(release, run, cluster)
        with dsl.If(release.outputs["Output"] == "gate", name="pending-gate"):
            # Registered by an earlier run whose gate never ran (killed or failed promote): the gate alone.
            gate = promote(
                registered_model_name=run.registered_model_name,
                version=release.outputs["pending_gate_version"],
                params=release.outputs["gate_params"],
                mlflow_tracking_uri=run.mlflow_tracking_uri,
            )
            configure(gate, "promote", cluster, cache=False)

    pipeline.__name__ = pipeline.__qualname__ = name.replace("-", "_") + "_pipeline"
    pipeline.__signature__ = _signature()
    pipeline.__doc__ = _docstring()
    return dsl.pipeline(name=name)(pipeline)


e3_pruner_pipeline = make_pipeline(CPU)
e3_pruner_gpu_pipeline = make_pipeline(GPU, GPU_PIPELINE_NAME)


if __name__ == "__main__":
    from e3prune_pipelines.compile import main

    main()
