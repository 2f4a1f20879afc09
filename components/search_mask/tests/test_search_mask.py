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
