import json
from pathlib import Path


def test_joins_the_one_part_into_the_cache_later_steps_read(chain):
    from e3prune.teacher import TeacherTopK

    part, joined = chain.teacher()["part"], chain.teacher()["cache"]
    assert joined.metadata["uri"].startswith(chain.prefix + "/work/join_teacher_cache/")
    assert joined.metadata["parts"] == 1 and joined.metadata["top_k"] == 10
    manifest = json.loads((Path(joined.metadata["uri"]) / "manifest.json").read_text())
    assert manifest["kind"] == "teacher_cache" and manifest["joined"]["parts"] == [part.metadata["uri"]]
    for split, entry in manifest["splits"].items():  # the part's files, referenced where they are
        assert all(Path(ref).is_file() and ref.startswith(part.metadata["uri"] + "/") for ref in entry["shards"])
        a, b = TeacherTopK(part.metadata["uri"]).load(split), TeacherTopK(joined.metadata["uri"]).load(split)
        assert all(a[k].equal(b[k]) for k in a), split


def test_without_a_storage_prefix_the_parts_are_copied_into_the_artifact(chain, tmp_path):
    from kfp import dsl

    from e3prune.teacher import TeacherTopK
    from e3prune_components.join_teacher_cache.component import join_teacher_cache

    part = chain.teacher()["part"]
    joined = dsl.Dataset(name="cache", uri=str(tmp_path / "joined"), metadata={})
    join_teacher_cache.python_func(parts=[part], storage_prefix="", cache=joined)
    assert joined.metadata["uri"] == joined.path
    manifest = json.loads((Path(joined.path) / "manifest.json").read_text())
    assert manifest["joined"]["copied"] and all(
        not Path(r).is_absolute() for r in manifest["splits"]["search"]["shards"]
    )
    a, b = TeacherTopK(part.metadata["uri"]).load("search"), TeacherTopK(joined.path).load("search")
    assert all(a[k].equal(b[k]) for k in a)
