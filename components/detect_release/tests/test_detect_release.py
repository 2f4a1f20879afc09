import pytest

from e3prune.errors import E3PruneError


def _call(tmp_path, **overrides):
    from kfp_calls import call_detect_release

    return call_detect_release(tmp_path, mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **overrides)


def test_pins_the_revision_and_counts_the_layers(tmp_path):
    import json

    from e3prune import sources

    out = _call(tmp_path, remove_ratio=0.4)
    assert out.source_revision == sources.resolve("builtin:reference").revision
    assert out.source_uri == "builtin:reference" and out.is_new and out.existing_version == ""
    saved = json.loads(out.run_config.read_text())
    assert saved["resolved_revision"] == out.source_revision and saved["remove_ratio"] == 0.4
    assert "Layers:** 24, removing 10 (40%)" in out.plan and "**Decision:** compress" in out.plan


@pytest.mark.parametrize(
    ("param", "value", "says"),
    [
        ("remove_ratio", 1.0, "(0, 1)"),
        ("remove_ratio", 0.01, "rounds to 0 layers"),
        ("distill_loss", "mse", "'entropy_kd', 'kd' or 'ce'"),
        ("search_budget_tokens", 0, "greater than or equal to 1"),
        ("registered_model_name", "my model", "letters, digits"),
        ("source_model", "ftp://host/model", "not a model source"),
        ("data_sources", " , ", "at least one source"),
        ("lm_eval_tasks", "no_such_task_xyz", "unknown lm-eval task"),
    ],
)
def test_a_bad_parameter_is_rejected_naming_it(tmp_path, param, value, says):
    with pytest.raises(E3PruneError) as err:
        _call(tmp_path, **{param: value})
    assert err.value.field == param
    assert says in str(err.value)
    assert not list(tmp_path.glob("detect-*/run_config.json"))  # nothing written before the check passed


def test_a_pinned_revision_that_does_not_match_is_refused(tmp_path):
    with pytest.raises(E3PruneError) as err:
        _call(tmp_path, source_revision="0" * 64)
    assert err.value.field == "source_revision" and "changed" in str(err.value)
