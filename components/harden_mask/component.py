"""harden_mask: the keep-set written as a real, shallower Hugging Face checkpoint."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def harden_mask(
    source_model: str,
    source_revision: str,
    search: Input[Artifact],
    storage_prefix: str,
    model: Output[Model],
):
    """Hardens the searched keep-set into a shallower checkpoint of the same model class.

    Builds the smaller config (per-layer fields sliced), copies the kept layers' weights under
    renumbered names, verifies that its logits and cached greedy tokens equal the masked source's,
    and only then writes safetensors, tokenizer and pruning.json.

    Args:
        source_model: The source checkpoint (same forms as the pipeline parameter).
        source_revision: The revision pinned by detect_release.
        search: Output of search_mask.
        storage_prefix: Where the checkpoint goes (s3://bucket/prefix or a directory); empty: into the artifact.
        model: The pruned checkpoint (metadata uri points at it; kept and removed layers).
    """
    import json
    import logging

    from e3prune import sources, storage
    from e3prune.harden import HardenConfig, harden_checkpoint
    from e3prune_components.locations import URI_KEY, input_uri, reusable, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    found = json.loads((storage.input_dir(input_uri(search), field="search") / "search.json").read_text())
    src = sources.fetch(source_model, source_revision)
    inputs = {"source": source_model, "revision": source_revision, "search": input_uri(search)}
    out = work_uri(storage_prefix, "harden_mask", model.path, inputs)
    if reusable(out):
        pruning = json.loads(storage.read_file(out, "pruning.json", field="model"))
        kept, removed = pruning["kept_layers"], pruning["removed_layers"]
    else:
        cfg = HardenConfig.parse(
            model=str(src), output=out, keep_layers=found["keep"], revision=source_revision,
            method="e3_gumbel_topk", metadata={"source_uri": source_model}, overwrite=True,
        )  # fmt: skip
        result = harden_checkpoint(cfg)
        kept, removed = result.kept_layers, result.removed_layers
    model.metadata.update(
        {URI_KEY: out, "kept_layers": kept, "removed_layers": removed, "num_hidden_layers": len(kept)}
    )
