"""Recurring compression on real servers: release detection over SeaweedFS (S3) and a real
``mlflow server`` — a new version is detected once, a second scheduled run names a gate that
never ran and is a no-op once it has, and two runs racing on one release register one version."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from e3prune import releases
from e3prune.gate import PromoteConfig, promote


def _upload_model(s3, local: Path, rel: str) -> str:
    for p in local.rglob("*"):
        if p.is_file():
            s3.client.upload_file(str(p), s3.bucket, s3.key(f"{rel}/{p.relative_to(local).as_posix()}"))
    return s3.uri(rel)


@pytest.fixture
def tiny_model(tmp_path, reference_dir) -> Path:
    from tiny_models import save_tiny_qwen3_with_reference_tokenizer

    save_tiny_qwen3_with_reference_tokenizer(tmp_path / "tiny", reference_dir)
    return tmp_path / "tiny"


def _detect(tmp_path, mlflow, source: str, **overrides):
    from kfp_calls import call_detect_release

    return call_detect_release(
        tmp_path,
        source_model=source,
        registered_model_name=mlflow.model_name,
        mlflow_tracking_uri=mlflow.uri,
        **{"remove_ratio": 0.5, **overrides},
    )


def _register(mlflow, release: releases.Release, run_key: str, ratio: float = 0.5) -> dict:
    from e3prune.registry import RegisterConfig, register

    cfg = RegisterConfig.parse(
        model_name=mlflow.model_name,
        model_uri=release.uri,  # an s3:// source; the registry stores the URI, it does not copy
        run_key=run_key,
        release_tags=releases.release_tags(release, ratio),
    )
    return register(cfg, tags={"e3prune.source": release.source})


def test_newest_s3_version_folder_is_detected_once(s3, mlflow, tiny_model, tmp_path):
    family = s3.uri("qwen-family")
    for version in ("v1", "v2"):
        _upload_model(s3, tiny_model, f"qwen-family/{version}")
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("qwen-family/notes/README.md"), Body=b"not a model")

    first = _detect(tmp_path, mlflow, family)
    assert first.source_uri == s3.uri("qwen-family/v2") and first.is_new and first.existing_version == ""
    release = releases.newest_release(family)
    assert release.revision == first.source_revision

    registered = _register(mlflow, release, run_key="nightly-1")
    # The run stopped after register: the next night does not compress again, but names the gate.
    pending = _detect(tmp_path, mlflow, family)
    assert not pending.is_new and pending.existing_version == registered["version"]
    assert f"registered as version {registered['version']} but its gate never ran" in pending.plan
    command = f"e3prune promote --model-name {mlflow.model_name} --version {registered['version']}"
    assert f"`{command} --tracking-uri {mlflow.uri}`" in pending.plan  # the run's own server
    assert "skip: nothing new" not in pending.plan
    promote(PromoteConfig.parse(model_name=mlflow.model_name, version=registered["version"]))
    # Once the gate has decided: nothing new, so the rest of the pipeline is skipped.
    second = _detect(tmp_path, mlflow, family)
    assert not second.is_new and second.existing_version == registered["version"]
    assert "skip: nothing new" in second.plan and "gate never ran" not in second.plan
    # Another ratio of the same release is a different compression; force re-runs this one.
    assert _detect(tmp_path, mlflow, family, remove_ratio=0.25).is_new
    assert _detect(tmp_path, mlflow, family, force=True).is_new

    # A new release arrives: v10 sorts after v2 in natural order, and is new.
    _upload_model(s3, tiny_model, "qwen-family/v10")
    third = _detect(tmp_path, mlflow, family)
    assert third.source_uri == s3.uri("qwen-family/v10") and third.is_new


def test_a_pinned_version_folder_and_a_bad_family(s3, mlflow, tiny_model, tmp_path):
    from e3prune.errors import E3PruneError

    for version in ("2026-11-01", "2026-11-15"):
        _upload_model(s3, tiny_model, f"fam/{version}")
    pinned = releases.newest_release(s3.uri("fam"), revision="2026-11-01")
    assert pinned.uri == s3.uri("fam/2026-11-01")
    with pytest.raises(E3PruneError) as err:
        releases.newest_release(s3.uri("fam"), revision="2027-01-01")
    assert err.value.field == "source_revision"
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("empty/readme.txt"), Body=b"x")
    with pytest.raises(E3PruneError) as err:
        releases.newest_release(s3.uri("empty"))
    assert err.value.field == "source_model" and "folder of model versions" in str(err.value)


def test_mlflow_registered_model_as_source(s3, mlflow, tiny_model, tmp_path):
    """models:/name follows the newest version of another registered model."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow.uri)
    upstream = f"{mlflow.model_name}-upstream"
    client.create_registered_model(upstream)
    for rel in ("up/a", "up/b"):
        client.create_model_version(upstream, _upload_model(s3, tiny_model, rel))
    release = releases.newest_release(f"models:/{upstream}", tracking_uri=mlflow.uri)
    assert release.uri == s3.uri("up/b") and release.source == f"models:/{upstream}"
    assert releases.newest_release(f"models:/{upstream}/1", tracking_uri=mlflow.uri).uri == s3.uri("up/a")


def test_two_runs_racing_on_one_release_register_one_version(s3, mlflow, tiny_model):
    from mlflow import MlflowClient

    release = releases.newest_release(_upload_model(s3, tiny_model, "race/v1"))
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(key: str) -> None:
        try:
            barrier.wait()
            results[key] = _register(mlflow, release, run_key=key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("nightly-a", "nightly-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    versions = MlflowClient(tracking_uri=mlflow.uri).search_model_versions(f"name='{mlflow.model_name}'")
    assert len(versions) == 1
    assert results["nightly-a"]["version"] == results["nightly-b"]["version"] == versions[0].version
    assert [r["duplicate_of_release"] for r in results.values()].count(False) >= 1
