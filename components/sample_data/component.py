"""sample_data: three disjoint token splits from the data sources."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sample_data(
    source_model: str,
    source_revision: str,
    params: dict,
    storage_prefix: str,
    data: Output[Dataset],
    summary: Output[Markdown],
):
    """Samples the search, distill and eval token splits with the source model's tokenizer.

    Documents are split between the three splits whole (no document is in two), packed with EOS
    separators into sequences of seq_len tokens, and written as safetensors shards with a
    manifest (counts, source fingerprints, tokenizer fingerprint, seed).

    Args:
        source_model: The model whose tokenizer is used (same forms as the pipeline parameter).
        source_revision: The revision pinned by detect_release.
        params: The sample step's parameters, validated by detect_release (sample_params).
        storage_prefix: Where the shards go (s3://bucket/prefix or a directory); empty: into the artifact.
        data: The token shards and manifest (metadata uri points at them).
        summary: Tokens and documents per split.
    """
    import logging

    from e3prune import sources
    from e3prune.data import SampleConfig, read_manifest, sample_data
    from e3prune_components.locations import URI_KEY, reusable, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = sources.fetch(source_model, source_revision)
    inputs = {"source": source_model, "revision": source_revision, "params": params}
    out = work_uri(storage_prefix, "sample_data", data.path, inputs)
    cfg = SampleConfig.parse({**params, "tokenizer": str(model), "output": out, "overwrite": True})
    if not reusable(out):
        sample_data(cfg)
    manifest = read_manifest(out)
    data.metadata.update({URI_KEY: out, "seq_len": cfg.seq_len})
    lines = ["## Data", "", "| split | sequences | tokens |", "|---|---|---|"]
    for name, split in manifest["splits"].items():
        data.metadata[f"{name}_tokens"] = split["tokens"]
        lines.append(f"| {name} | {split['sequences']:,} | {split['tokens']:,} |")
    with open(summary.path, "w") as fh:
        fh.write("\n".join(lines) + f"\n\nWritten to `{out}`.\n")
