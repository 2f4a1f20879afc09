"""export: publish the distilled model, its card and metrics, to durable storage."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(
    distilled: Input[Model],
    evaluation: Input[Artifact],
    storage_prefix: str,
    registered_model_name: str,
    source_model: str,
    source_revision: str,
    run_key: str,
    exported: Output[Model],
):
    """Publishes the distilled checkpoint to <storage_prefix>/models/<name>/<run>/.

    Safetensors, tokenizer, generation config, pruning.json, metrics.json and a model card. Every
    file is uploaded before the _COMPLETE.json marker (sizes, sha256), so a failure part-way
    leaves nothing that looks complete and nothing that register would accept; a retry replaces
    the leftover. S3 endpoint and credentials come from the pod's environment only.

    Args:
        distilled: Output of distill.
        evaluation: Output of evaluate.
        storage_prefix: s3://bucket/prefix or a directory; empty: into this artifact.
        registered_model_name: Name of the model (path segment and card title).
        source_model: The source model, for the card.
        source_revision: The source revision, for the card.
        run_key: The pipeline run's id (path segment).
        exported: The published model (metadata uri points at it).
    """
    import logging

    from e3prune.export import ExportConfig, export_model
    from e3prune_components.locations import URI_KEY, input_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if storage_prefix:
        destination = f"{storage_prefix.rstrip('/')}/models/{registered_model_name}/{run_key}"
    else:
        destination = exported.path
    result = export_model(
        ExportConfig.parse(
            model=input_uri(distilled),
            destination=destination,
            metrics=input_uri(evaluation),
            model_name=registered_model_name,
            source_model=source_model,
            source_revision=source_revision,
        )
    )
    exported.metadata.update({URI_KEY: result["uri"], "files": result["files"]})
    print(f"exported to {result['uri']}")
