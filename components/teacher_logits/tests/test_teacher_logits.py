def test_caches_top_k_for_search_and_distill(chain):
    from e3prune.teacher import TeacherTopK

    part = chain.teacher()["part"]
    assert part.metadata["uri"].startswith(chain.prefix + "/work/teacher_logits/")
    assert part.metadata["top_k"] == 10
    assert part.metadata["bytes_per_token"] <= 64
    assert (part.metadata["part"], part.metadata["parts"]) == (0, 1)
    reader = TeacherTopK(part.metadata["uri"])  # the one part of an undivided pass is a whole cache
    for split in ("search", "distill"):
        assert reader.sequences(split) > 0
        batch = reader.batch(split, 0, 2)
        assert batch["values"].shape == batch["ids"].shape == (*batch["input_ids"].shape, 10)
