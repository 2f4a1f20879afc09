"""search_mask: the Gumbel-TopK search for the layers to keep."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def search_mask(
    source_model: str,
    source_revision: str,
    teacher_cache: Input[Dataset],
    storage_prefix: str,
    search: Output[Artifact],
    metrics: Output[Metrics],
    plot: Output[HTML],
    params: dict,
) -> NamedTuple("Searched", keep_layers=str, removed_layers=str):
    """Searches the keep-mask with a Gumbel-TopK sampler; the model's weights stay frozen.

    Only the keep-logits θ train, against the cached teacher top-K (KL), with a hard top-k
    forward and a straight-through backward, τ annealed over the token budget; the final set is
    chosen among θ's top-k and nearby candidates by their loss on the search split (docs/method.md).

    Args:
        source_model: The model whose layers are searched.
        source_revision: The revision pinned by detect_release.
        teacher_cache: Output of teacher_logits (with the search split).
        storage_prefix: Where search.json and trajectory.jsonl go; empty: into the artifact.
        search: search.json (keep-set, θ, candidates) and trajectory.jsonl (θ, mask, loss per step).
        metrics: Final loss, tokens, seconds and tokens/s of the search.
        plot: θ per layer over the steps and the sampled masks.
        params: The search step's parameters, validated by detect_release (search_params).

    Returns:
        keep_layers: Comma-separated kept layer ids.
        removed_layers: Comma-separated removed layer ids.
    """
    import json
    import logging
    from collections import namedtuple
    from pathlib import Path

    from e3prune import sources, storage
    from e3prune.report import html_image, read_trajectory, search_plot_png
    from e3prune.search import SearchConfig, search_mask
    from e3prune_components.locations import URI_KEY, input_uri, reusable, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = sources.fetch(source_model, source_revision)
    inputs = {"source": source_model, "revision": source_revision, "teacher_cache": input_uri(teacher_cache)}
    # Keyed by the inputs: a retried or rerun task finds its resumable state (<output>.state) and continues.
    out = work_uri(storage_prefix, "search_mask", search.path, {**inputs, "params": params})
    if not reusable(out):
        paths = {"model": str(model), "teacher_cache": input_uri(teacher_cache), "output": out}
        search_mask(SearchConfig.parse({**params, **paths, "state": f"{out}.state", "overwrite": True}))
    local = storage.input_dir(out, field="search")
    result = json.loads((local / "search.json").read_text())
    trajectory = read_trajectory(Path(local))
    search.metadata.update({URI_KEY: out, "keep": result["keep"], "removed": result["removed"]})
    if trajectory:
        metrics.log_metric("final_loss", trajectory[-1]["loss"])
    metrics.log_metric("kept_layers", len(result["keep"]))
    metrics.log_metric("removed_layers", len(result["removed"]))
    metrics.log_metric("search_tokens", result["search_tokens"])
    metrics.log_metric("search_seconds", result["search_seconds"])
    metrics.log_metric("tokens_per_second", result["tokens_per_second"])
    with open(plot.path, "w") as fh:
        fh.write(html_image(search_plot_png(result, trajectory), "E³ mask search"))
    print(json.dumps({"keep": result["keep"], "removed": result["removed"]}))
    return namedtuple("Searched", ["keep_layers", "removed_layers"])(
        ",".join(map(str, result["keep"])), ",".join(map(str, result["removed"]))
    )
