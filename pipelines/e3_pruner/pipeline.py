"""The e3-pruner pipeline: source model → sampled data → teacher top-K cache → mask search →
hardened checkpoint → distillation → evaluation → export → MLflow registration.

Compile with ``e3prune compile`` (or ``python -m e3prune_pipelines.e3_pruner.pipeline``); the
committed ``pipeline.yaml`` beside this file is what you upload in the Kubeflow UI, and a test
fails when it drifts from a fresh compile.

Cluster settings that are not run parameters are fixed at compile time, in one place each:
- the image: ``components/image.py`` (``E3PRUNE_IMAGE``);
- resources per step: :data:`RESOURCES` (kfp.local ignores them);
- credentials: every step gets ``AWS_*`` from the Secret :data:`S3_SECRET` and endpoints
  (``AWS_ENDPOINT_URL``, ``MLFLOW_TRACKING_URI``) from the ConfigMap :data:`ENV_CONFIG_MAP`, both
  optional, both created by the Helm chart (``charts/e3-pruner``). Credentials are never
  pipeline parameters.
"""

from kfp import dsl, kubernetes

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
S3_SECRET = "e3-pruner-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and HF_TOKEN for gated hub models)
ENV_CONFIG_MAP = "e3-pruner-env"  # keys AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, MLFLOW_TRACKING_URI
SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN")}
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


def _compress(release: dsl.PipelineTask, p: dict) -> None:
    """The steps after detect-release, inside its condition: every step reads the concrete release.

    ``p`` holds the pipeline's parameters (as pipeline channels), by name.
    """
    source = release.outputs["source_uri"]
    revision = release.outputs["source_revision_resolved"]
    data = _configure(
        sample_data(
            source_model=source,
            source_revision=revision,
            data_sources=p["data_sources"],
            storage_prefix=p["storage_prefix"],
            seq_len=p["seq_len"],
            search_split_tokens=p["search_split_tokens"],
            distill_split_tokens=p["distill_split_tokens"],
            eval_split_tokens=p["eval_split_tokens"],
            sample_seed=p["sample_seed"],
            allow_repeat=p["allow_repeat"],
        ),
        "sample-data",
    )
    cache = _configure(
        teacher_logits(
            source_model=source,
            source_revision=revision,
            data=data.outputs["data"],
            storage_prefix=p["storage_prefix"],
            top_k=p["top_k"],
            teacher_batch_size=p["teacher_batch_size"],
        ),
        "teacher-logits",
    )
    search = _configure(
        search_mask(
            source_model=source,
            source_revision=revision,
            teacher_cache=cache.outputs["cache"],
            storage_prefix=p["storage_prefix"],
            remove_ratio=p["remove_ratio"],
            search_budget_tokens=p["search_budget_tokens"],
            search_batch_size=p["search_batch_size"],
            search_learning_rate=p["search_learning_rate"],
            search_tau_start=p["search_tau_start"],
            search_tau_end=p["search_tau_end"],
            search_seed=p["search_seed"],
        ),
        "search-mask",
    )
    pruned = _configure(
        harden_mask(
            source_model=source,
            source_revision=revision,
            search=search.outputs["search"],
            storage_prefix=p["storage_prefix"],
        ),
        "harden-mask",
    )
    student = _configure(
        distill(
            model=pruned.outputs["model"],
            teacher_cache=cache.outputs["cache"],
            storage_prefix=p["storage_prefix"],
            distill_budget_tokens=p["distill_budget_tokens"],
            distill_loss=p["distill_loss"],
            distill_learning_rate=p["distill_learning_rate"],
            distill_batch_size=p["distill_batch_size"],
            distill_allow_repeat=p["distill_allow_repeat"],
        ),
        "distill",
    )
    evaluation = _configure(
        evaluate(
            source_model=source,
            source_revision=revision,
            pruned=pruned.outputs["model"],
            distilled=student.outputs["distilled"],
            data=data.outputs["data"],
            storage_prefix=p["storage_prefix"],
            eval_batch_size=p["eval_batch_size"],
            lm_eval_tasks=p["lm_eval_tasks"],
            lm_eval_limit=p["lm_eval_limit"],
        ),
        "evaluate",
    )
    exported = _configure(
        export(
            distilled=student.outputs["distilled"],
            evaluation=evaluation.outputs["evaluation"],
            storage_prefix=p["storage_prefix"],
            registered_model_name=p["registered_model_name"],
            source_model=source,
            source_revision=revision,
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
            mlflow_tracking_uri=p["mlflow_tracking_uri"],
        ),
        "register",
        cache=False,  # a side effect in MLflow, idempotent per run
    )
    _configure(
        promote(
            registered_model_name=registered.outputs["model_name"],
            version=registered.outputs["version"],
            gate_max_perplexity_ratio=p["gate_max_perplexity_ratio"],
            gate_min_speedup=p["gate_min_speedup"],
            gate_lm_eval_min=p["gate_lm_eval_min"],
            gate_require_better_than_champion=p["gate_require_better_than_champion"],
            mlflow_tracking_uri=p["mlflow_tracking_uri"],
        ),
        "promote",
        cache=False,  # reads and moves aliases
    )


@dsl.pipeline(name=PIPELINE_NAME)
def e3_pruner_pipeline(
    source_model: str = "builtin:reference",
    source_revision: str = "",
    registered_model_name: str = "e3-pruner-reference",
    storage_prefix: str = "",
    remove_ratio: float = 0.25,
    data_sources: str = "builtin:reference",
    seq_len: int = 256,
    search_split_tokens: int = 65536,
    distill_split_tokens: int = 131072,
    eval_split_tokens: int = 65536,
    sample_seed: int = 0,
    allow_repeat: bool = False,
    top_k: int = 10,
    teacher_batch_size: int = 8,
    search_budget_tokens: int = 614400,
    search_batch_size: int = 8,
    search_learning_rate: float = 0.05,
    search_tau_start: float = 1.0,
    search_tau_end: float = 0.05,
    search_seed: int = 0,
    distill_budget_tokens: int = 524288,
    distill_loss: str = "kd",
    distill_learning_rate: float = 0.0003,
    distill_batch_size: int = 8,
    distill_allow_repeat: bool = True,
    eval_batch_size: int = 8,
    lm_eval_tasks: str = "",
    lm_eval_limit: int = 0,
    mlflow_experiment: str = "e3-pruner",
    mlflow_tracking_uri: str = "",
    gate_max_perplexity_ratio: float = 1.5,
    gate_min_speedup: float = 1.0,
    gate_lm_eval_min: str = "",
    gate_require_better_than_champion: bool = True,
    force: bool = False,
):
    """Compresses a causal LM by removing whole decoder layers (E³-Pruner) and registers it in MLflow.

    Args:
        source_model: Model to compress: a hub id (org/name), s3://bucket/prefix (a model, or a folder of version folders: the newest is taken), models:/name (newest MLflow version), a directory in the image, or builtin:reference (the small shipped model).
        source_revision: Pin a release (hub branch, tag or commit; S3 version folder name; content sha256); empty: the newest.
        registered_model_name: MLflow registered model that gets the new version (alias challenger).
        storage_prefix: s3://bucket/prefix for step data (work/) and the exported model (models/); empty keeps everything in KFP artifacts (small models only).
        remove_ratio: Fraction of decoder layers to remove, in (0, 1); rounded to whole layers.
        data_sources: Comma-separated data sources (jsonl/parquet/text files, hub dataset ids, builtin:reference) or a JSON list of {uri, weight, text_field, messages_field, split}.
        seq_len: Tokens per packed sequence (at most the model's positions).
        search_split_tokens: Tokens sampled for the search split.
        distill_split_tokens: Tokens sampled for the distill split.
        eval_split_tokens: Tokens sampled for the eval split (evaluation only, never for choices).
        sample_seed: Seed of the data sampler.
        allow_repeat: Let the sampler cycle documents when the sources are smaller than the budgets.
        top_k: Teacher logits cached per token (K).
        teacher_batch_size: Sequences per teacher forward.
        search_budget_tokens: Tokens the Gumbel-TopK search trains on.
        search_batch_size: Sequences per search step.
        search_learning_rate: Learning rate of the keep-logits.
        search_tau_start: Gumbel-TopK temperature at the start.
        search_tau_end: Gumbel-TopK temperature at the end.
        search_seed: Seed of the Gumbel noise.
        distill_budget_tokens: Tokens of distillation.
        distill_loss: kd (plain top-K KD, the default), entropy_kd (E³ entropy-aware) or ce.
        distill_learning_rate: Peak AdamW learning rate of distillation.
        distill_batch_size: Sequences per distillation micro-batch.
        distill_allow_repeat: Cycle the distill split when the budget is larger than it.
        eval_batch_size: Sequences per evaluation forward.
        lm_eval_tasks: Comma-separated lm-evaluation-harness tasks (e.g. python_stdlib_cloze); empty: none.
        lm_eval_limit: Items per lm-eval task; 0: all.
        mlflow_experiment: MLflow experiment of the run.
        mlflow_tracking_uri: MLflow tracking URI; empty: MLFLOW_TRACKING_URI from the e3-pruner-env ConfigMap.
        gate_max_perplexity_ratio: Promotion gate: distilled/teacher perplexity at most this.
        gate_min_speedup: Promotion gate: prefill speedup over the teacher at least this.
        gate_lm_eval_min: Promotion gate: JSON object of metric key to minimum, e.g. {"lm_eval.hellaswag.student.acc_norm": 0.5}; empty: none.
        gate_require_better_than_champion: Promotion gate: perplexity not worse than the current champion of the same source.
        force: Compress even when the registry holds this release at this ratio already.
    """
    release = _configure(
        detect_release(
            source_model=source_model,
            source_revision=source_revision,
            data_sources=data_sources,
            seq_len=seq_len,
            search_split_tokens=search_split_tokens,
            distill_split_tokens=distill_split_tokens,
            eval_split_tokens=eval_split_tokens,
            sample_seed=sample_seed,
            allow_repeat=allow_repeat,
            top_k=top_k,
            teacher_batch_size=teacher_batch_size,
            remove_ratio=remove_ratio,
            search_budget_tokens=search_budget_tokens,
            search_batch_size=search_batch_size,
            search_learning_rate=search_learning_rate,
            search_tau_start=search_tau_start,
            search_tau_end=search_tau_end,
            search_seed=search_seed,
            distill_budget_tokens=distill_budget_tokens,
            distill_loss=distill_loss,
            distill_learning_rate=distill_learning_rate,
            distill_batch_size=distill_batch_size,
            distill_allow_repeat=distill_allow_repeat,
            eval_batch_size=eval_batch_size,
            lm_eval_tasks=lm_eval_tasks,
            lm_eval_limit=lm_eval_limit,
            registered_model_name=registered_model_name,
            storage_prefix=storage_prefix,
            mlflow_experiment=mlflow_experiment,
            mlflow_tracking_uri=mlflow_tracking_uri,
            gate_max_perplexity_ratio=gate_max_perplexity_ratio,
            gate_min_speedup=gate_min_speedup,
            gate_lm_eval_min=gate_lm_eval_min,
            gate_require_better_than_champion=gate_require_better_than_champion,
            force=force,
        ),
        "detect-release",
        cache=False,  # resolves moving revisions and asks the registry: must run every time
    )
    with dsl.If(release.outputs["Output"] == True, name="new-release"):  # noqa: E712 - a KFP condition, not Python
        _compress(release, {name: value for name, value in locals().items() if name != "release"})


if __name__ == "__main__":
    from e3prune_pipelines.compile import main

    main()
