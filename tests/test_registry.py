"""The MLflow registry against a real ``mlflow server`` (sqlite backend, artifacts proxied to a real S3).

Register is idempotent by run key, curves and artifacts land in the run, the exported model is
an external logged model of the run (with its metrics, its weights never uploaded) and the
version is created from it; an unreachable server fails fast naming ``mlflow_tracking_uri``; the
promotion gate moves ``champion`` only for a better challenger and ``rollback`` undoes it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelStatus
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL, MLFLOW_MODEL_VERSIONS
from s3_server import free_ports

from e3prune.cli import main
from e3prune.errors import E3PruneError
from e3prune.gate import DECISION_TAG, HISTORY_TAG, REASONS_TAG, PromoteConfig, promote, rollback
from e3prune.registry import (
    CHALLENGER,
    CHAMPION,
    SOURCE_TAG,
    RegisterConfig,
    find_versions,
    register,
    version_model_id,
)
from e3prune.tracking import RUN_KEY_TAG, check_tracking_server

CURVES = {
    "search/loss": [(0, 2.0), (1, 1.5), (2, 1.2)],
    "distill/loss": [(i * 10, 3.0 / (i + 1)) for i in range(12)],
}


def _register(mlflow, tmp_path, run_key: str, *, metrics=None, source="Qwen/Qwen3-8B", params=None, **cfg):
    summary = tmp_path / f"summary-{run_key}.md"
    summary.write_text(f"# {run_key}\n")
    return register(
        RegisterConfig.parse(
            model_name=mlflow.model_name,
            model_uri=cfg.pop("model_uri", f"s3://models/{mlflow.model_name}/{run_key}"),
            run_key=run_key,
            **cfg,
        ),
        params=params if params is not None else {"remove_ratio": "0.25", "loss": "kd"},
        metrics=metrics
        if metrics is not None
        else {"student.perplexity": 40.0, "student.perplexity_ratio": 1.2, "speedup.prefill": 1.3},
        curves=CURVES,
        artifacts={"eval/summary.md": summary},
        tags={SOURCE_TAG: source, "e3prune.source_revision": "abc123"},
    )


def test_register_is_idempotent_and_complete(mlflow, s3, tmp_path):
    run_key = f"job-{uuid.uuid4().hex[:8]}"
    first = _register(mlflow, tmp_path, run_key, params={"remove_ratio": "0.25", "aws_secret_access_key": "x"})
    second = _register(mlflow, tmp_path, run_key, params={"remove_ratio": "0.25", "aws_secret_access_key": "x"})
    first_metrics = {"student.perplexity": 40.0, "student.perplexity_ratio": 1.2, "speedup.prefill": 1.3}
    assert first == second
    assert first["alias"] == CHALLENGER and first["model_uri"] == f"s3://models/{mlflow.model_name}/{run_key}"

    client = mlflow.client()
    runs = client.search_runs([first["experiment_id"]], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'")
    assert [r.info.run_id for r in runs] == [first["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"remove_ratio": "0.25"}  # the credential-looking one was never sent
    assert run.data.metrics["student.perplexity"] == 40.0
    for key, points in CURVES.items():  # each step once, though logged by two attempts
        history = sorted((m.step, m.value) for m in client.get_metric_history(first["run_id"], key))
        assert history == [(s, pytest.approx(v)) for s, v in points]

    versions = client.search_model_versions(f"name = '{mlflow.model_name}'")
    assert [v.version for v in versions] == ["1"]
    mv = client.get_model_version_by_alias(mlflow.model_name, CHALLENGER)
    assert mv.version == first["version"] == "1"
    assert mv.source == first["model_uri"] and mv.run_id == first["run_id"]
    assert mv.tags[RUN_KEY_TAG] == run_key and mv.tags[SOURCE_TAG] == "Qwen/Qwen3-8B"
    assert float(mv.tags["metric.student.perplexity_ratio"]) == 1.2

    # Lineage: run -> logged model (external, with the run's metrics) -> version; one of each.
    assert version_model_id(mv) == first["model_id"]
    model = client.get_logged_model(first["model_id"])
    assert json.loads(model.tags[MLFLOW_MODEL_VERSIONS]) == [{"name": mlflow.model_name, "version": 1}]
    assert model.source_run_id == first["run_id"] and model.status == LoggedModelStatus.READY
    assert model.tags[MLFLOW_MODEL_IS_EXTERNAL] == "true" and model.tags[RUN_KEY_TAG] == run_key
    assert {m.key: m.value for m in model.metrics} == first_metrics
    assert model.params == {"remove_ratio": "0.25"}
    models = client.search_logged_models([first["experiment_id"]], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.model_id for m in models] == [model.model_id]

    # The artifact went through the server into the S3 bucket (the client has no S3 role here).
    assert [a.path for a in client.list_artifacts(first["run_id"], "eval")] == ["eval/summary.md"]
    keys = [
        o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="mlflow-artifacts/").get("Contents", [])
    ]
    assert any(k.endswith(f"{first['run_id']}/artifacts/eval/summary.md") for k in keys), keys
    # No weights in MLflow's store: the external model holds only its MLmodel description.
    model_keys = [k for k in keys if f"/models/{model.model_id}/" in k]
    assert [k.rsplit("/", 1)[-1] for k in model_keys] == ["MLmodel"], model_keys

    assert [v.version for v in find_versions(mlflow.model_name, {"e3prune.source_revision": "abc123"})] == ["1"]
    assert find_versions(mlflow.model_name, {"e3prune.source_revision": "other"}) == []
    assert find_versions(f"absent-{uuid.uuid4().hex[:6]}", {"e3prune.source_revision": "abc123"}) == []


def test_register_refuses_a_changed_param_for_the_same_run_key(mlflow, tmp_path):
    run_key = f"job-{uuid.uuid4().hex[:8]}"
    _register(mlflow, tmp_path, run_key, params={"remove_ratio": "0.25"})
    with pytest.raises(E3PruneError, match="remove_ratio") as err:
        _register(mlflow, tmp_path, run_key, params={"remove_ratio": "0.5"})
    assert err.value.field == "params"


def test_register_uploads_a_local_model_directory(mlflow, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = _register(mlflow, tmp_path, f"job-{uuid.uuid4().hex[:8]}", model_uri=str(model))
    client = mlflow.client()
    logged = client.get_logged_model(out["model_id"])
    assert out["model_uri"] == logged.artifact_location and out["model_uri"].startswith("mlflow-artifacts:")
    assert MLFLOW_MODEL_IS_EXTERNAL not in logged.tags and logged.source_run_id == out["run_id"]
    assert version_model_id(client.get_model_version(mlflow.model_name, out["version"])) == out["model_id"]
    local = download_artifacts(artifact_uri=out["model_uri"], dst_path=str(tmp_path / "dl"), tracking_uri=mlflow.uri)
    assert sorted(p.name for p in Path(local).iterdir()) == ["config.json"]


def test_unreachable_server_fails_fast_naming_the_setting(tmp_path, monkeypatch):
    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(E3PruneError, match="unreachable") as err:
        register(
            RegisterConfig.parse(model_name="m", model_uri="s3://b/m", run_key="k"),
            params={},
            metrics={},
            curves={},
            artifacts={},
            tags={},
        )
    assert err.value.field == "mlflow_tracking_uri"
    assert time.monotonic() - started < 10
    with pytest.raises(E3PruneError, match="unreachable") as err:
        check_tracking_server(f"http://user:hunter2@127.0.0.1:{port}/", timeout_seconds=2)
    assert "hunter2" not in str(err.value)
    check_tracking_server(f"sqlite:///{tmp_path}/mlflow.db")  # nothing to check without a server

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(E3PruneError, match="MLFLOW_TRACKING_URI") as err:
        register(RegisterConfig.parse(model_name="m", model_uri="s3://b/m", run_key="k"))
    assert err.value.field == "mlflow_tracking_uri"


def test_server_down_then_up(mlflow, tmp_path, monkeypatch):
    run_key = f"job-{uuid.uuid4().hex[:8]}"
    mlflow.server.stop()
    started = time.monotonic()
    with pytest.raises(E3PruneError, match="unreachable") as err:
        _register(mlflow, tmp_path, run_key)
    assert err.value.field == "mlflow_tracking_uri" and time.monotonic() - started < 15

    # A server lost after the health check: MLflow's own retries are short and the error is ours.
    with monkeypatch.context() as m:
        m.setattr("e3prune.tracking.check_tracking_server", lambda uri, timeout_seconds=10: None)
        started = time.monotonic()
        with pytest.raises(E3PruneError, match="lost the MLflow tracking server") as err:
            _register(mlflow, tmp_path, run_key)
        assert err.value.field == "mlflow_tracking_uri" and time.monotonic() - started < 30

    mlflow.server.start()
    out = _register(mlflow, tmp_path, run_key)
    assert out["version"] == "1"
    assert [v.version for v in mlflow.client().search_model_versions(f"name = '{mlflow.model_name}'")] == ["1"]


def test_bad_names_are_user_errors():
    with pytest.raises(E3PruneError) as err:
        RegisterConfig.parse(model_name="Qwen/Qwen3-8B", model_uri="s3://b/m", run_key="k")
    assert err.value.field == "model_name" and "'/'" in str(err.value)
    with pytest.raises(E3PruneError) as err:
        RegisterConfig.parse(model_name="m", model_uri="s3://b/m", run_key="k", alias="champion")
    assert err.value.field == "alias"
    with pytest.raises(E3PruneError) as err:
        PromoteConfig.parse(model_name="m", version="three")
    assert err.value.field == "version"


def _metrics(ppl: float, ratio: float, speedup: float = 1.3, acc: float = 0.5) -> dict[str, float]:
    return {
        "student.perplexity": ppl,
        "student.perplexity_ratio": ratio,
        "speedup.prefill": speedup,
        "lm_eval.python_stdlib_cloze.student.acc": acc,
    }


def test_gate_promotes_the_better_rejects_the_worse_and_rolls_back(mlflow, tmp_path):
    name = mlflow.model_name
    client = mlflow.client()
    with pytest.raises(E3PruneError, match="does not exist") as err:
        rollback(name)
    assert err.value.field == "model_name"
    v1 = _register(mlflow, tmp_path, "run-1", metrics=_metrics(40.0, 1.2))["version"]
    with pytest.raises(E3PruneError, match="no champion") as err:
        rollback(name)
    assert err.value.field == "model_name"

    first = promote(PromoteConfig.parse(model_name=name))
    assert first["promoted"] and first["version"] == v1 and first["previous_champion"] is None
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1

    # Worse than the champion, and over the absolute ratio: rejected with both reasons recorded.
    v2 = _register(mlflow, tmp_path, "run-2", metrics=_metrics(70.0, 1.8))["version"]
    worse = promote(PromoteConfig.parse(model_name=name, lm_eval_min={"lm_eval.python_stdlib_cloze.student.acc": 0.4}))
    assert not worse["promoted"] and worse["version"] == v2 and worse["previous_champion"] == v1
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1
    tags = client.get_model_version(name, v2).tags
    assert tags[DECISION_TAG] == "rejected"
    reasons = json.loads(tags[REASONS_TAG])
    assert reasons == worse["reasons"] and len(reasons) == 2
    assert any("perplexity ratio" in r and "max_perplexity_ratio" in r for r in reasons)
    assert any("perplexity vs champion" in r for r in reasons)
    assert "rejected" in worse["summary_markdown"] and "| **fail** |" in worse["summary_markdown"]

    # Better: becomes champion; an lm-eval minimum it misses would have stopped it.
    v3 = _register(mlflow, tmp_path, "run-3", metrics=_metrics(38.0, 1.15, acc=0.45))["version"]
    strict = promote(PromoteConfig.parse(model_name=name, lm_eval_min={"lm_eval.python_stdlib_cloze.student.acc": 0.5}))
    assert not strict["promoted"] and strict["reasons"] == [
        "lm_eval.python_stdlib_cloze.student.acc 0.45 < 0.5 (lm_eval_min)"
    ]
    better = promote(PromoteConfig.parse(model_name=name, version=v3))
    assert better["promoted"] and better["previous_champion"] == v1
    assert client.get_model_version_by_alias(name, CHAMPION).version == v3
    assert client.get_model_version(name, v3).tags[DECISION_TAG] == "promoted"
    assert json.loads(client.get_registered_model(name).tags[HISTORY_TAG]) == [v1, v3]

    # A challenger of another source is not compared with this champion.
    v4 = _register(mlflow, tmp_path, "run-4", metrics=_metrics(90.0, 1.3), source="meta-llama/Llama-3.1-8B")["version"]
    other = promote(PromoteConfig.parse(model_name=name, version=v4))
    assert other["promoted"] and any("another source" in r for r in other["reasons"])

    assert rollback(name)["champion"] == v3
    back = rollback(name)
    assert back == {"model_name": name, "champion": v1, "rolled_back": v3, "history": [v1]}
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1
    with pytest.raises(E3PruneError, match="no previous one") as err:
        rollback(name)
    assert err.value.field == "model_name"


def test_promote_and_rollback_commands(mlflow, tmp_path, capsys):
    _register(mlflow, tmp_path, "run-1", metrics=_metrics(40.0, 1.2))
    assert main(["promote", "--model-name", mlflow.model_name]) == 0
    assert "promoted to champion" in capsys.readouterr().out
    _register(mlflow, tmp_path, "run-2", metrics=_metrics(41.0, 1.25))
    assert main(["promote", "--model-name", mlflow.model_name, "--lm-eval-min", "lm_eval.x.acc=0.3"]) == 3
    out = capsys.readouterr().out
    assert "rejected" in out and "lm_eval.x.acc is missing" in out
    assert main(["promote", "--model-name", mlflow.model_name, "--champion-tolerance-ratio", "1.05"]) == 0
    capsys.readouterr()
    assert main(["rollback", "--model-name", mlflow.model_name]) == 0
    assert "version 1" in capsys.readouterr().out
    assert main(["rollback", "--model-name", mlflow.model_name]) == 2
    assert "error: model_name:" in capsys.readouterr().err
