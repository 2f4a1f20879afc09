from pathlib import Path


def test_reports_quality_and_speed_of_all_three_models(chain):
    out = chain.evaluate()
    m = out["metrics"].metadata
    for key in ("teacher.perplexity", "pruned.perplexity", "student.perplexity", "student.perplexity_ratio"):
        assert m[key] > 0, key
    assert m["teacher.layers"] == 24 and m["student.layers"] == 18
    assert m["speedup.prefill"] > 0
    assert out["evaluation"].metadata["student.perplexity"] == m["student.perplexity"]
    assert "perplexity" in Path(out["report"].path).read_text().lower()
