"""detect_release: check every parameter, find the newest release of the source, and whether it is new."""

from kfp import dsl
from kfp.dsl import Artifact, Markdown, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def detect_release(
    source_model: str,
    source_revision: str,
    data_sources: str,
    seq_len: int,
    search_split_tokens: int,
    distill_split_tokens: int,
    eval_split_tokens: int,
    sample_seed: int,
    allow_repeat: bool,
    top_k: int,
    teacher_batch_size: int,
    remove_ratio: float,
    search_budget_tokens: int,
    search_batch_size: int,
    search_learning_rate: float,
    search_tau_start: float,
    search_tau_end: float,
    search_seed: int,
    distill_budget_tokens: int,
    distill_loss: str,
    distill_learning_rate: float,
    distill_batch_size: int,
    distill_allow_repeat: bool,
    eval_batch_size: int,
    lm_eval_tasks: str,
    lm_eval_limit: int,
    registered_model_name: str,
    storage_prefix: str,
    mlflow_experiment: str,
    mlflow_tracking_uri: str,
    gate_max_perplexity_ratio: float,
    gate_min_speedup: float,
    gate_lm_eval_min: str,
    gate_require_better_than_champion: bool,
    force: bool,
    run_config: Output[Artifact],
    plan: Output[Markdown],
    source_uri: dsl.OutputPath(str),
    source_revision_resolved: dsl.OutputPath(str),
    existing_version: dsl.OutputPath(str),
) -> bool:
    """Checks every pipeline parameter, finds the newest release of the source and whether it is new.

    Runs first and is never cached. A bad parameter fails here in seconds with a message naming
    it, before data is sampled or a model loaded. The source is resolved to its newest release
    (hub: the branch head's commit; an S3 folder of versions: the last version folder; MLflow
    models:/name: the highest version) pinned to an immutable revision that every later step
    receives, so Kubeflow's cache never serves a new release from an old run. When the registry
    already holds this release at this ratio, is_new is false and the rest of the pipeline is
    skipped: a schedule compresses each release once.

    Args:
        source_model: builtin:reference, a local directory, s3://bucket/prefix (a model or a folder of versions), models:/name or a hub id.
        source_revision: Pin a revision (hub ref, S3 version folder name or content sha256); empty: the newest.
        data_sources: Comma-separated data sources or a JSON list of source objects.
        seq_len: Tokens per packed sequence.
        search_split_tokens: Tokens sampled for the search split.
        distill_split_tokens: Tokens sampled for the distill split.
        eval_split_tokens: Tokens sampled for the eval split.
        sample_seed: Seed of the data sampler.
        allow_repeat: Let the sampler cycle documents.
        top_k: Teacher logits cached per token.
        teacher_batch_size: Sequences per teacher forward.
        remove_ratio: Fraction of decoder layers to remove, in (0, 1).
        search_budget_tokens: Tokens the search trains on.
        search_batch_size: Sequences per search step.
        search_learning_rate: Learning rate of the keep-logits.
        search_tau_start: Temperature at the start.
        search_tau_end: Temperature at the end.
        search_seed: Seed of the Gumbel noise.
        distill_budget_tokens: Tokens of distillation.
        distill_loss: kd, entropy_kd or ce.
        distill_learning_rate: Peak AdamW learning rate.
        distill_batch_size: Sequences per distillation micro-batch.
        distill_allow_repeat: Cycle the distill split when the budget is larger.
        eval_batch_size: Sequences per evaluation forward.
        lm_eval_tasks: Comma-separated lm-evaluation-harness tasks.
        lm_eval_limit: Items per lm-eval task; 0: all.
        registered_model_name: MLflow registered model name.
        storage_prefix: s3://bucket/prefix (or local directory) for step data and the export.
        mlflow_experiment: MLflow experiment.
        mlflow_tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI.
        gate_max_perplexity_ratio: Promotion gate: distilled/teacher perplexity at most this.
        gate_min_speedup: Promotion gate: prefill speedup at least this.
        gate_lm_eval_min: Promotion gate: JSON object of metric key to minimum.
        gate_require_better_than_champion: Promotion gate: not worse than the champion of the same source.
        force: Compress even when the registry holds this release already.
        run_config: Every parameter and the resolved release, as JSON.
        plan: What the run will do, or why it skips.
        source_uri: The concrete model of the newest release.
        source_revision_resolved: Its immutable revision.
        existing_version: The registered version that holds this release already, or empty.

    Returns:
        Whether the release is new (the rest of the pipeline runs only then).
    """
    import json
    import logging

    from e3prune import releases, sources
    from e3prune.model_io import load_config
    from e3prune.run_config import RunConfig
    from e3prune.selection import n_remove_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = {k: v for k, v in locals().items() if k in RunConfig.model_fields}
    cfg = RunConfig.parse(settings)
    cfg.check()
    tracking = cfg.mlflow_tracking_uri or None
    release = releases.newest_release(cfg.source_model, cfg.source_revision, tracking)
    config = load_config(sources.fetch(release.uri, release.revision), field="source_model")
    n_layers = config.num_hidden_layers
    n_remove = n_remove_for(cfg.remove_ratio, n_layers)
    done = releases.compressed_version(cfg.registered_model_name, release, cfg.remove_ratio, tracking)
    is_new = done is None or force
    with open(run_config.path, "w") as fh:
        json.dump(
            {**cfg.model_dump(), "force": force, "source_uri": release.uri, "resolved_revision": release.revision},
            fh,
            indent=2,
        )
    run_config.metadata.update({"source_uri": release.uri, "source_revision": release.revision, "is_new": is_new})
    lines = [
        "## Release",
        "",
        f"- **Source:** `{cfg.source_model}` → `{release.uri}` at revision `{release.revision}`",
        f"- **Layers:** {n_layers}, removing {n_remove} ({cfg.remove_ratio:.0%}), keeping {n_layers - n_remove}",
    ]
    if done is not None:
        lines.append(f"- **Already compressed:** `{cfg.registered_model_name}` version {done.version}")
    lines.append(
        "- **Decision:** "
        + ("compress (forced)" if done is not None and force else "compress" if is_new else "skip: nothing new")
    )
    with open(plan.path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    for path, value in (
        (source_uri, release.uri),
        (source_revision_resolved, release.revision),
        (existing_version, "" if done is None else str(done.version)),
    ):
        with open(path, "w") as fh:
            fh.write(value)
    # One unnamed output: kfp.local resolves a condition on a task's `Output`, not on named outputs.
    return is_new
