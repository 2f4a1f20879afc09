"""The promote step through its own function (``promote.python_func``) against a real MLflow
server (tests/mlflow_server.py): a version that passes the quality gate becomes ``champion``, a
worse one is rejected and the champion stays, and the ``decision`` Markdown says which and why.

(The gate's every rule, and rollback, are checked on the library in tests/test_registry.py.)
"""

from pathlib import Path

SOURCE = "Qwen/Qwen3-8B"


def _register(mlflow, run_key: str, perplexity: float, ratio: float) -> str:
    from e3prune.registry import SOURCE_TAG, RegisterConfig, register

    cfg = RegisterConfig.parse(
        model_name=mlflow.model_name, model_uri=f"s3://models/{mlflow.model_name}/{run_key}", run_key=run_key
    )
    metrics = {"student.perplexity": perplexity, "student.perplexity_ratio": ratio, "speedup.prefill": 1.3}
    return register(cfg, metrics=metrics, tags={SOURCE_TAG: SOURCE})["version"]


def _promote(mlflow, tmp_path: Path, version: str, tracking_uri: str) -> tuple[bool, str]:
    from kfp import dsl

    from e3prune.run_config import RunConfig
    from e3prune_components.promote.component import promote

    decision = dsl.Markdown(name="decision", uri=str(tmp_path / f"decision-{version}.md"), metadata={})
    params = RunConfig.parse(registered_model_name=mlflow.model_name).gate_params()  # as detect_release hands it on
    out = promote.python_func(
        registered_model_name=mlflow.model_name,
        version=version,
        decision=decision,
        params=params,
        mlflow_tracking_uri=tracking_uri,
    )
    return out.promoted, Path(decision.path).read_text()


def test_promote_passes_the_better_version_and_rejects_the_worse(mlflow, tmp_path):
    client = mlflow.client()
    v1 = _register(mlflow, "run-1", perplexity=40.0, ratio=1.2)
    promoted, text = _promote(mlflow, tmp_path, v1, tracking_uri=mlflow.uri)
    assert promoted is True
    assert f"version {v1} — promoted to champion" in text and "Champion: none → version" in text
    assert client.get_model_version_by_alias(mlflow.model_name, "champion").version == v1

    # Worse than the champion and over the default ratio (1.5): rejected, the champion stays.
    # An empty mlflow_tracking_uri means the pod's $MLFLOW_TRACKING_URI (set by the fixture).
    v2 = _register(mlflow, "run-2", perplexity=70.0, ratio=1.8)
    promoted, text = _promote(mlflow, tmp_path, v2, tracking_uri="")
    assert promoted is False
    assert f"version {v2} — rejected" in text and f"Champion unchanged (version {v1})." in text
    assert "| **fail** |" in text
    assert client.get_model_version_by_alias(mlflow.model_name, "champion").version == v1
    assert client.get_model_version_by_alias(mlflow.model_name, "challenger").version == v2
