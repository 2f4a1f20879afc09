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
    remove_ratio: float = 0.25,
    search_budget_tokens: int = 614400,
    search_batch_size: int = 8,
    search_learning_rate: float = 0.05,
    search_tau_start: float = 1.0,
    search_tau_end: float = 0.05,
    search_seed: int = 0,
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
        remove_ratio: Fraction of decoder layers to remove, in (0, 1).
        search_budget_tokens: Tokens the search trains on.
        search_batch_size: Sequences per step.
        search_learning_rate: Learning rate of θ.
        search_tau_start: Temperature at the start.
        search_tau_end: Temperature at the end.
        search_seed: Seed of the Gumbel noise.

    Returns:
        keep_layers: Comma-separated kept layer ids.
        removed_layers: Comma-separated removed layer ids.
    """
    import json
    import logging
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from e3prune import sources, storage
    from e3prune.report import html_image, read_trajectory, search_plot_png
    from e3prune.run_config import RunConfig
    from e3prune.search import search_mask
    from e3prune_components.locations import URI_KEY, input_uri, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = RunConfig.parse(
        remove_ratio=remove_ratio,
        search_budget_tokens=search_budget_tokens,
        search_batch_size=search_batch_size,
        search_learning_rate=search_learning_rate,
        search_tau_start=search_tau_start,
        search_tau_end=search_tau_end,
        search_seed=search_seed,
    )
    model = sources.fetch(source_model, source_revision)
    out = work_uri(storage_prefix, "search_mask", search.path)
    state = tempfile.mkdtemp(prefix="e3prune-search-state-") if storage.is_s3(out) else None
    result = search_mask(run.search_config(str(model), input_uri(teacher_cache), out, state=state))
    local = storage.input_dir(out, field="search")
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
