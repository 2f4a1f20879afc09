def test_caches_top_k_for_search_and_distill(chain):
    from e3prune.teacher import TeacherTopK

    cache = chain.teacher()["cache"]
    assert cache.metadata["uri"].startswith(chain.prefix + "/work/teacher_logits/")
    assert cache.metadata["top_k"] == 10
    assert cache.metadata["bytes_per_token"] <= 64
    reader = TeacherTopK(cache.metadata["uri"])
    for split in ("search", "distill"):
        assert reader.sequences(split) > 0
        batch = reader.batch(split, 0, 2)
        assert batch["values"].shape == batch["ids"].shape == (*batch["input_ids"].shape, 10)
