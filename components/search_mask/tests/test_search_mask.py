import json
from pathlib import Path


def test_returns_the_keep_set_with_metrics_and_a_plot(chain):
    from e3prune import storage

    out = chain.search()
    keep = [int(x) for x in out["returned"].keep_layers.split(",")]
    removed = [int(x) for x in out["returned"].removed_layers.split(",")]
    assert len(keep) == 18 and len(removed) == 6 and sorted(keep + removed) == list(range(24))
    found = json.loads((storage.input_dir(out["search"].metadata["uri"]) / "search.json").read_text())
    assert found["keep"] == keep == out["search"].metadata["keep"]
    assert out["metrics"].metadata["kept_layers"] == 18
    assert out["metrics"].metadata["search_tokens"] >= 2048
    html = Path(out["plot"].path).read_text()
    assert html.startswith("<html>") and "data:image/png;base64," in html


def test_a_baseline_selector_writes_the_same_search_json(chain, tmp_path):
    """selection_method=sleb: the step runs SLEB instead of the search, and harden reads the result as usual."""
    from e3prune import storage
    from e3prune_components.search_mask.component import search_mask

    out = {"search": chain.art("Artifact", "sleb"), "metrics": chain.art("Metrics", "m"), "plot": chain.art("HTML", "p")}
    returned = search_mask.python_func(
        source_model="builtin:reference", source_revision=chain.revision(), teacher_cache=chain.teacher()["cache"],
        storage_prefix=str(tmp_path / "storage"), params=chain.params("search", selection_method="sleb"), **out,
    )  # fmt: skip
    found = json.loads((storage.input_dir(out["search"].metadata["uri"]) / "search.json").read_text())
    assert found["selection_method"] == "sleb" and found["chosen_from"] == "sleb"
    assert len(found["removed"]) == 6 and returned.removed_layers == ",".join(map(str, found["removed"]))
