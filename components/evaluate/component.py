"""evaluate: quality and speed of the teacher, the pruned and the distilled model."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    source_model: str,
    source_revision: str,
    pruned: Input[Model],
    distilled: Input[Model],
    data: Input[Dataset],
    storage_prefix: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    params: dict,
    report: Output[Markdown],
):
    """Measures perplexity, agreement with the teacher, speed and lm-eval scores.

    On the eval split (never used for choosing anything): perplexity of teacher, pruned and
    distilled model, top-1 agreement and KL to the teacher, the share of the perplexity gap
    distillation closed; prefill and decode tokens/s of teacher and student, interleaved; and
    the lm-evaluation-harness tasks asked for.

    Args:
        source_model: The teacher (same forms as the pipeline parameter).
        source_revision: The revision pinned by detect_release.
        pruned: Output of harden_mask.
        distilled: Output of distill.
        data: Output of sample_data (with the eval split).
        storage_prefix: Where metrics.json and summary.md go; empty: into the artifact.
        evaluation: metrics.json (stable schema) and summary.md.
        metrics: The headline numbers, flat (teacher.perplexity, student.perplexity_ratio, speedup.prefill, ...).
        params: The evaluate step's parameters, validated by detect_release (evaluate_params).
        report: The summary table.
    """
    import json
    import logging

    from e3prune import sources, storage
    from e3prune.evaluate import METRICS_FILE, SUMMARY_FILE, EvaluateConfig, evaluate
    from e3prune.report import flat_metrics
    from e3prune_components.locations import URI_KEY, input_uri, reusable, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    teacher = sources.fetch(source_model, source_revision)
    models = {"teacher": str(teacher), "pruned": input_uri(pruned), "student": input_uri(distilled)}
    inputs = {**models, "revision": source_revision, "data": input_uri(data), "params": params}
    out = work_uri(storage_prefix, "evaluate", evaluation.path, inputs)
    cfg = EvaluateConfig.parse({**params, **models, "data": input_uri(data), "output": out, "overwrite": True})
    if reusable(out):
        result = json.loads((storage.input_dir(out, field="evaluation") / METRICS_FILE).read_text())
    else:
        result = evaluate(cfg)
    flat = flat_metrics(result)
    for key, value in flat.items():
        metrics.log_metric(key, value)
    evaluation.metadata.update({URI_KEY: out, **{k: v for k, v in flat.items() if "." in k and "lm_eval" not in k}})
    with open(report.path, "w") as fh:
        fh.write((storage.input_dir(out, field="evaluation") / SUMMARY_FILE).read_text())
