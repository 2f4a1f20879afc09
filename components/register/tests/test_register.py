"""The register step refuses an incomplete export before it talks to MLflow.

(Registering for real, and MLflow being down, are checked on a real server in
tests/test_pipeline_e2e.py and tests/test_registry.py.)
"""

import json

import pytest


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
        )
    assert err.value.field == "exported"
    assert "_COMPLETE.json" in str(err.value)
