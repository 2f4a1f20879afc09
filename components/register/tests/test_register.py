"""The register step: its library function (``e3prune.registration.register_run``, also
``e3prune register``) against a real ``mlflow server``, and the component refusing an incomplete
export before it talks to MLflow.

(Registering a whole pipeline run, and MLflow being down, are checked in
tests/test_pipeline_e2e.py and tests/test_registry.py.)
"""

import json
import tempfile
from pathlib import Path

import pytest


def _step_outputs(root: Path, model_name: str) -> dict[str, str]:
    """What detect_release, search_mask, distill, evaluate and export leave, for a 4-layer model."""
    run_config = {
        "registered_model_name": model_name,
        "mlflow_experiment": "e3-pruner-test",
        "mlflow_tracking_uri": "",
        "source_model": "builtin:reference",
        "source_uri": "builtin:reference",
        "resolved_revision": "abc123",
        "remove_ratio": 0.25,
        "gate_max_perplexity_ratio": 1.5,
        "gate_min_speedup": 1.0,
    }
    (root / "run_config.json").write_text(json.dumps(run_config))
    search = root / "search"
    search.mkdir()
    (search / "search.json").write_text(json.dumps({"num_hidden_layers": 4, "keep": [0, 1, 3], "removed": [2]}))
    rows = [{"step": s, "loss": 2.0 - s / 10, "tau": 1.0, "k": 3, "theta": [1, 1, -1, 1], "keep": [0, 1, 3]}
            for s in range(3)]  # fmt: skip
    (search / "trajectory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    distilled = root / "distilled"
    distilled.mkdir()
    distill_rows = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(4)]
    (distilled / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in distill_rows))
    evaluation = root / "evaluation"
    evaluation.mkdir()
    metrics = {
        "models": {"teacher": {"perplexity": 30.0, "layers": 4}, "student": {"perplexity": 33.0, "layers": 3}},
        "comparisons": {"student": {"perplexity_ratio": 1.1}},
        "speed": {"speedup": {"student": {"prefill": 1.3}}},
    }
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    (evaluation / "summary.md").write_text("# evaluation\n")
    exported = root / "exported"
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    (exported / "pruning.json").write_text(json.dumps({"removed": [2]}))
    return {
        "run_config": str(root / "run_config.json"),
        "search": str(search),
        "distilled": str(distilled),
        "evaluation": str(evaluation),
        "exported": str(exported),
    }


def test_register_run_logs_registers_and_leaves_no_staging_directory(mlflow, tmp_path, monkeypatch, capsys):
    from e3prune.cli import main
    from e3prune.registration import STAGING_PREFIX, register_run
    from e3prune.registry import version_model_id

    outputs = _step_outputs(tmp_path, mlflow.model_name)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    result = register_run(**outputs, run_key="job-1", run_name="run one", tracking_uri=None)
    assert not list(temp.glob(f"{STAGING_PREFIX}*"))
    assert result["version"] == "1" and result["model_name"] == mlflow.model_name
    assert f"version {result['version']}" in result["summary_markdown"]

    client = mlflow.client()
    run = client.get_run(result["run_id"])
    assert run.info.run_name == "run one" and run.data.params["resolved_revision"] == "abc123"
    assert run.data.metrics["student.perplexity_ratio"] == 1.1
    assert [m.step for m in client.get_metric_history(result["run_id"], "distill/loss")] == [0, 1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"plots", "evaluation", "search", "pruning.json", "run_config.json"} <= artifacts
    mv = client.get_model_version(mlflow.model_name, "1")
    assert mv.tags["e3prune.kept_layers"] == "0,1,3" and mv.tags["e3prune.source_revision"] == "abc123"
    assert version_model_id(mv) == result["model_id"]
    assert client.get_logged_model(result["model_id"]).source_run_id == result["run_id"]

    # `e3prune register` is the same function: a rerun with the same key reuses run, model and version.
    argv = ["register", "--run-key", "job-1", "--run-name", "run one"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in outputs.items()]
    assert main(argv) == 0
    assert f"version {result['version']}" in capsys.readouterr().out
    assert [v.version for v in client.search_model_versions(f"name = '{mlflow.model_name}'")] == ["1"]
    assert not list(temp.glob(f"{STAGING_PREFIX}*"))


def test_an_export_without_its_marker_is_never_registered(s3, tmp_path, monkeypatch):
    from kfp import dsl

    from e3prune.errors import E3PruneError
    from e3prune_components.register.component import register

    (tmp_path / "run_config.json").write_text(json.dumps({"registered_model_name": "x"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: must not be reached
    # What a failed upload leaves: files, but no _COMPLETE.json marker.
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("models/x/run-1/config.json"), Body=b"{}")
    half = s3.uri("models/x/run-1")

    def art(cls, name, **meta):
        return cls(name=name, uri=str(tmp_path / name), metadata=meta)

    with pytest.raises(E3PruneError) as err:
        register.python_func(
            run_config=art(dsl.Artifact, "run_config.json"),
            search=art(dsl.Artifact, "search"),
            distilled=art(dsl.Model, "distilled"),
            evaluation=art(dsl.Artifact, "evaluation"),
            exported=art(dsl.Model, "exported", uri=half),
            run_key="run-1",
            run_name="run-1",
            summary=art(dsl.Markdown, "summary"),
            mlflow_tracking_uri="",
        )
    assert err.value.field == "exported"
    assert "_COMPLETE.json" in str(err.value)
