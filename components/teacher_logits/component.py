"""teacher_logits: one teacher pass that caches the top-K logits of every token."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def teacher_logits(
    source_model: str,
    source_revision: str,
    data: Input[Dataset],
    storage_prefix: str,
    params: dict,
    shard_index: int,
    cache: Output[Dataset],
):
    """Runs the teacher once over its share of the search and distill splits and caches its top-K logits.

    Per token it stores the K largest logits (bf16), their ids (int32) and the full log-sum-exp
    (fp32): about 64 bytes a token at K = 10. The search and distillation read this cache, so
    the teacher is never loaded again. The pipeline runs teacher_shards of these side by side,
    task shard_index computing whole cache files of every split; join_teacher_cache joins them.

    Args:
        source_model: The teacher (same forms as the pipeline parameter).
        source_revision: The revision pinned by detect_release.
        data: Output of sample_data.
        storage_prefix: Where the cache goes (s3://bucket/prefix or a directory); empty: into the artifact.
        params: The teacher step's parameters, validated by detect_release (teacher_params).
        shard_index: Which of the teacher_shards tasks this is (0-based).
        cache: This task's part of the top-K cache (metadata uri points at it).
    """
    import json
    import logging

    from e3prune import sources, storage
    from e3prune.teacher import TeacherLogitsConfig, teacher_logits
    from e3prune_components.locations import URI_KEY, input_uri, reusable, work_uri

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = sources.fetch(source_model, source_revision)
    inputs = {
        "source": source_model, "revision": source_revision, "data": input_uri(data), "params": params,
        "shard_index": shard_index,
    }  # fmt: skip
    out = work_uri(storage_prefix, "teacher_logits", cache.path, inputs)
    if reusable(out):
        manifest = json.loads(storage.read_file(out, "manifest.json", field="cache"))
    else:
        paths = {"model": str(model), "data": input_uri(data), "output": out, "overwrite": True, "shard_index": shard_index}
        manifest = teacher_logits(TeacherLogitsConfig.parse({**params, **paths}))
    cache.metadata.update(
        {URI_KEY: out, "top_k": manifest["top_k"], "bytes_per_token": manifest["bytes_per_token"]["logits"],
         "part": manifest["part"]["index"], "parts": manifest["part"]["count"]}
    )  # fmt: skip
