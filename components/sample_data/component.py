"""sample_data: three disjoint token splits from the data sources."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sample_data(
    source_model: str,
    source_revision: str,
    data_sources: str,
    storage_prefix: str,
    data: Output[Dataset],
    summary: Output[Markdown],
    seq_len: int = 256,
    search_split_tokens: int = 65536,
    distill_split_tokens: int = 131072,
    eval_split_tokens: int = 65536,
    sample_seed: int = 0,
    allow_repeat: bool = False,
):
    """Samples the search, distill and eval token splits with the source model's tokenizer.

    Documents are split between the three splits whole (no document is in two), packed with EOS
    separators into sequences of seq_len tokens, and written as safetensors shards with a
    manifest (counts, source fingerprints, tokenizer fingerprint, seed).

    Args:
        source_model: The model whose tokenizer is used (same forms as the pipeline parameter).
        source_revision: The revision pinned by detect_release.
        data_sources: Comma-separated sources or a JSON list of {uri, weight, text_field, messages_field, split}.
        storage_prefix: Where the shards go (s3://bucket/prefix or a directory); empty: into the artifact.
        data: The token shards and manifest (metadata uri points at them).
        summary: Tokens and documents per split.
        seq_len: Tokens per packed sequence.
        search_split_tokens: Token budget of the search split.
        distill_split_tokens: Token budget of the distill split.
        eval_split_tokens: Token budget of the eval split.
        sample_seed: Seed of the sampler; equal seeds give equal splits.
        allow_repeat: Cycle documents when a source is smaller than the budgets.
    """
    import logging

    from e3prune import sources
    from e3prune.data import read_manifest, sample_data
    from e3prune.run_config import RunConfig
    from e3prune_components.locations import URI_KEY, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = RunConfig.parse(
        source_model=source_model,
        data_sources=data_sources,
        seq_len=seq_len,
        search_split_tokens=search_split_tokens,
        distill_split_tokens=distill_split_tokens,
        eval_split_tokens=eval_split_tokens,
        sample_seed=sample_seed,
        allow_repeat=allow_repeat,
    )
    model = sources.fetch(source_model, source_revision)
    out = work_uri(storage_prefix, "sample_data", data.path)
    sample_data(run.sample_config(tokenizer=str(model), output=out))
    manifest = read_manifest(out)
    data.metadata.update({URI_KEY: out, "seq_len": seq_len})
    lines = ["## Data", "", "| split | sequences | tokens |", "|---|---|---|"]
    for name, split in manifest["splits"].items():
        data.metadata[f"{name}_tokens"] = split["tokens"]
        lines.append(f"| {name} | {split['sequences']:,} | {split['tokens']:,} |")
    with open(summary.path, "w") as fh:
        fh.write("\n".join(lines) + f"\n\nWritten to `{out}`.\n")
