def test_trains_the_student_and_reports_its_curve_end(chain):
    from e3prune.model_io import load_config, model_dir

    out = chain.distill()
    uri = out["distilled"].metadata["uri"]
    assert uri.startswith(chain.prefix + "/work/distill/")
    assert load_config(uri).num_hidden_layers == 18
    assert (model_dir(uri) / "metrics.jsonl").read_text().count("\n") == out["distilled"].metadata["steps"] >= 1
    metrics = out["metrics"].metadata
    assert metrics["tokens"] >= 2048 and metrics["final_loss"] > 0
