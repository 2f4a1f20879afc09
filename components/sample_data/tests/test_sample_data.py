from pathlib import Path


def test_writes_three_splits_under_the_prefix_and_points_to_them(chain):
    from e3prune.data import read_manifest

    out = chain.sample()
    data = out["data"]
    uri = data.metadata["uri"]
    assert uri.startswith(chain.prefix + "/work/sample_data/")
    manifest = read_manifest(uri)
    assert set(manifest["splits"]) == {"search", "distill", "eval"}
    for split in ("search", "distill", "eval"):
        assert data.metadata[f"{split}_tokens"] == manifest["splits"][split]["tokens"] > 0
    assert data.metadata["seq_len"] == 64
    summary = Path(out["summary"].path).read_text()
    assert "| search |" in summary and uri in summary
    assert not Path(data.path).exists()  # the data is not copied into the KFP artifact
