"""distill: recover the pruned model's quality from the teacher's cached top-K logits."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(
    model: Input[Model],
    teacher_cache: Input[Dataset],
    storage_prefix: str,
    distilled: Output[Model],
    metrics: Output[Metrics],
    distill_budget_tokens: int = 131072,
    distill_loss: str = "kd",
    distill_learning_rate: float = 0.0003,
    distill_batch_size: int = 8,
    distill_allow_repeat: bool = True,
):
    """Distills the pruned model from the cached teacher top-K logits (accelerate; resumable).

    Trains every weight of the student against the teacher's top-K distribution on the distill
    split: plain top-K KD by default, or the entropy-aware loss of E³-Pruner (distill_loss =
    entropy_kd). Checkpoints are kept at a location stable across retries of this task, so a
    retried pod resumes instead of starting over. On several GPUs the same code runs under
    accelerate (docs/operations.md).

    Args:
        model: Output of harden_mask.
        teacher_cache: Output of teacher_logits (with the distill split).
        storage_prefix: Where the checkpoint goes (s3://bucket/prefix or a directory); empty: into the artifact.
        distilled: The distilled checkpoint (metadata uri points at it).
        metrics: Final loss, KL, tokens and tokens/s.
        distill_budget_tokens: Tokens of distillation.
        distill_loss: kd, entropy_kd or ce.
        distill_learning_rate: Peak AdamW learning rate.
        distill_batch_size: Sequences per micro-batch.
        distill_allow_repeat: Cycle the distill split when the budget is larger than it.
    """
    import hashlib
    import logging

    from e3prune.distill import distill
    from e3prune.run_config import RunConfig
    from e3prune_components.locations import URI_KEY, input_uri, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = RunConfig.parse(
        distill_budget_tokens=distill_budget_tokens,
        distill_loss=distill_loss,
        distill_learning_rate=distill_learning_rate,
        distill_batch_size=distill_batch_size,
        distill_allow_repeat=distill_allow_repeat,
    )
    out = work_uri(storage_prefix, "distill", distilled.path)
    checkpoints = None
    if storage_prefix:  # stable per task (the artifact URI survives retries), unlike the fresh output location
        task = hashlib.sha256(distilled.uri.encode()).hexdigest()[:16]
        checkpoints = f"{storage_prefix.rstrip('/')}/work/distill-checkpoints/{task}"
    summary = distill(run.distill_config(input_uri(model), input_uri(teacher_cache), out, checkpoint_dir=checkpoints))
    distilled.metadata.update({URI_KEY: out, "steps": summary["steps"], "tokens": summary["tokens"]})
    for key, value in (summary.get("final") or {}).items():
        if value is not None:
            metrics.log_metric(f"final_{key}", float(value))
    metrics.log_metric("tokens", summary["tokens"])
    metrics.log_metric("steps", summary["steps"])
    metrics.log_metric("tokens_per_second", summary["tokens_per_second"])
