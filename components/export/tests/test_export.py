"""export publishes completely or not at all, on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest


def _export(chain, destination_prefix: str, run_key: str = "run-1"):
    from kfp import dsl

    from e3prune_components.export.component import export

    exported = dsl.Model(name="exported", uri=str(chain.root / f"exported-{run_key}"), metadata={})
    export.python_func(
        distilled=chain.distill()["distilled"],
        evaluation=chain.evaluate()["evaluation"],
        storage_prefix=destination_prefix,
        registered_model_name="tiny",
        source_model="builtin:reference",
        source_revision=chain.revision(),
        run_key=run_key,
        exported=exported,
    )
    return exported


def test_publishes_model_card_and_metrics_with_the_marker_last(chain, s3):
    from e3prune import storage

    exported = _export(chain, s3.uri("p"))
    uri = exported.metadata["uri"]
    assert uri == s3.uri("p/models/tiny/run-1")
    local = storage.input_dir(uri, field="exported")  # verified against _COMPLETE.json
    names = {p.name for p in local.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pruning.json", "metrics.json", "README.md"} <= names
    assert "metrics.jsonl" not in names  # training records stay with the run
    card = (local / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "24 → 18 layers" in card
    assert json.loads((local / "metrics.json").read_text())["models"]["student"]["layers"] == 18
    # The retry of a step that had finished finds the same export and leaves it as it is.
    marker = s3.client.get_object(Bucket=s3.bucket, Key=s3.key("p/models/tiny/run-1/_COMPLETE.json"))
    _export(chain, s3.uri("p"))
    again = s3.client.get_object(Bucket=s3.bucket, Key=s3.key("p/models/tiny/run-1/_COMPLETE.json"))
    assert again["LastModified"] == marker["LastModified"]


def test_a_retry_replaces_what_a_failed_attempt_left(chain, s3):
    from e3prune import storage

    leftover = s3.key("p/models/tiny/run-2/model.safetensors.partial-junk")
    s3.client.put_object(Bucket=s3.bucket, Key=leftover, Body=b"half")
    exported = _export(chain, s3.uri("p"), run_key="run-2")
    local = storage.input_dir(exported.metadata["uri"], field="exported")
    assert not (local / "model.safetensors.partial-junk").exists()
    keys = [
        o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=s3.key("p/models/tiny/run-2/"))["Contents"]
    ]
    assert leftover not in keys


def test_s3_going_down_mid_export_fails_clearly_and_leaves_nothing_complete(chain, tmp_path, monkeypatch):
    """A server of its own, stopped after the first object arrives: the marker is never written."""
    from s3_server import ACCESS_KEY, SECRET_KEY, start_seaweed, stop_seaweed

    from e3prune import storage
    from e3prune.errors import E3PruneError

    chain.evaluate()  # the inputs first, so that only the export talks to the doomed server
    server = start_seaweed(tmp_path / "doomed")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("E3PRUNE_CACHE", str(tmp_path / "cache"))
    stored: list[str] = []
    sending: list[str] = []
    real_client = storage._client

    def client_that_watches():
        c = real_client()

        def before_put(params, **_):
            sending.append(params["Key"])

        def after_put(http_response, **_):
            if http_response.status_code == 200:
                stored.append(sending[-1])
                if len(stored) == 1:
                    stop_seaweed(server)  # the server dies with the upload under way

        c.meta.events.register("before-parameter-build.s3.PutObject", before_put)
        c.meta.events.register("after-call.s3.PutObject", after_put)
        return c

    monkeypatch.setattr(storage, "_client", client_that_watches)
    started = time.monotonic()
    try:
        with pytest.raises(E3PruneError) as err:
            _export(chain, f"s3://{server.bucket}/p", run_key="run-3")
    finally:
        stop_seaweed(server)
    assert err.value.field == "destination"
    assert "AWS_ENDPOINT_URL" in str(err.value) and "reachable" in str(err.value)
    assert len(stored) == 1 and not any(u.endswith("_COMPLETE.json") for u in stored)
    assert time.monotonic() - started < 120  # bounded retries, not a hang
    assert not Path(chain.root / "exported-run-3").exists()
