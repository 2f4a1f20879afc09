"""join_teacher_cache: one teacher cache from the parts the fanned-out teacher tasks wrote."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def join_teacher_cache(
    parts: Input[list[Dataset]],
    storage_prefix: str,
    cache: Output[Dataset],
):
    """Joins the parts of the teacher pass into the one cache every later step reads.

    The teacher_shards tasks each wrote whole cache files of every split; this step checks that
    the parts come from one pass (same teacher, K, sequence length, tokenizer and data) and cover
    every file once, in order, and writes one manifest that lists the parts' files where they are
    (no shard data is copied). Without a storage prefix the parts are KFP artifacts that only this
    pod sees, so their files are copied into this step's artifact (small models only).

    Args:
        parts: The teacher_logits outputs, one per task, collected in task order (dsl.Collected).
        storage_prefix: Where the joined manifest goes (s3://bucket/prefix or a directory); empty: into the artifact.
        cache: The joined top-K cache (metadata uri points at it).
    """
    import json
    import logging

    from e3prune import storage
    from e3prune.teacher import join_teacher_cache as join
    from e3prune_components.locations import URI_KEY, input_uri, reusable, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # dsl.Collected keeps the loop's order in KFP; sorting on the recorded part index makes it explicit.
    ordered = sorted(parts, key=lambda a: (a.metadata or {}).get("part", 0))
    uris = [input_uri(a) for a in ordered]
    out = work_uri(storage_prefix, "join_teacher_cache", cache.path, {"parts": uris})
    if reusable(out):
        manifest = json.loads(storage.read_file(out, "manifest.json", field="cache"))
    else:
        manifest = join(uris, out, overwrite=True, copy_files=not storage_prefix)
    cache.metadata.update(
        {URI_KEY: out, "top_k": manifest["top_k"], "bytes_per_token": manifest["bytes_per_token"]["logits"],
         "parts": len(uris)}
    )  # fmt: skip
