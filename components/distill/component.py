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
    params: dict,
    metrics: Output[Metrics],
):
    """Distills the pruned model from the cached teacher top-K logits (accelerate; resumable).

    Trains every weight of the student against the teacher's top-K distribution on the distill
    split: plain top-K KD by default, or the entropy-aware loss of E³-Pruner (distill_loss =
    entropy_kd). Checkpoints are kept at a location stable across retries of this task, so a
    retried pod resumes instead of starting over. distill_processes starts one training process
    per GPU of the pod (accelerate, FSDP; 0 = all visible GPUs) or N gloo processes on CPU;
    distill_nodes above 1 runs the training as a Kubeflow Trainer TrainJob (docs/operations.md).

    Args:
        model: Output of harden_mask.
        teacher_cache: Output of teacher_logits (with the distill split).
        storage_prefix: Where the checkpoint goes (s3://bucket/prefix or a directory); empty: into the artifact.
        distilled: The distilled checkpoint (metadata uri points at it).
        params: The distill step's parameters, validated by detect_release (distill_params).
        metrics: Final loss, KL, tokens and tokens/s.
    """
    import json
    import logging

    from e3prune import storage
    from e3prune.distill import SUMMARY_FILE, DistillConfig
    from e3prune.launch import launch_distill
    from e3prune_components.image import IMAGE
    from e3prune_components.locations import URI_KEY, input_uri, reusable, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inputs = {"student": input_uri(model), "teacher_cache": input_uri(teacher_cache)}
    # Keyed by the inputs: a retried or rerun task finds its checkpoints (<output>.ckpt) and resumes.
    out = work_uri(storage_prefix, "distill", distilled.path, {**inputs, "params": params})
    if reusable(out):
        summary = json.loads(storage.read_file(out, SUMMARY_FILE, field="distilled"))
    else:
        # IMAGE is this pod's image (the pipeline sets E3PRUNE_IMAGE on the task): a TrainJob's pods run it too.
        cfg = DistillConfig.parse({**params, **inputs, "output": out, "overwrite": True})
        summary = launch_distill(cfg, image=IMAGE)
    distilled.metadata.update({URI_KEY: out, "steps": summary["steps"], "tokens": summary["tokens"]})
    for key, value in (summary.get("final") or {}).items():
        if value is not None:
            metrics.log_metric(f"final_{key}", float(value))
    metrics.log_metric("tokens", summary["tokens"])
    metrics.log_metric("steps", summary["steps"])
    metrics.log_metric("tokens_per_second", summary["tokens_per_second"])
