"""MLflow credentials reach the server, and nothing else: no log, output, summary or MLflow record.

Real processes: an ``mlflow server`` behind MLflow's own ``basic-auth`` app (it answers 401
without the password), artifacts proxied to the SeaweedFS S3 server, and ``e3prune run`` (every
step a ``kfp.local`` subprocess) given the password the supported way, as
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (docs/operations.md, "Credentials and
endpoints"). Then the secret is searched for in everything the run left: its output, every file
under its output directory, every param, tag and metric key of the MLflow run, its logged model
and registered version, every artifact the server stored, and the server's own files and log. A
tracking URI that carries credentials is refused before anything runs, naming the parameter.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import AuthMlflowServer
from s3_server import SeaweedS3, client, free_ports

SECRET = f"pw-{uuid.uuid4().hex}"  # the tracking server's password for this module
TOKEN = f"tok-{uuid.uuid4().hex}"  # MLFLOW_TRACKING_TOKEN, set too: it must not leak either
USER = "admin"
NEEDLES = (SECRET, TOKEN, base64.b64encode(f"{USER}:{SECRET}".encode()).decode())  # and the Basic header
SMALL = {
    "seq_len": 64,
    "search_split_tokens": 8192,
    "distill_split_tokens": 4096,
    "eval_split_tokens": 2048,
    "search_budget_tokens": 4096,
    "distill_budget_tokens": 2048,
}
CREDENTIALED_URIS = [
    f"http://u:{SECRET}@127.0.0.1:1",
    f"https://{SECRET}@mlflow.example.com",
    f"http://127.0.0.1:1/?token={SECRET}",
    f"http://127.0.0.1:1/mlflow?x=1&password={SECRET}",
]


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [n for n in NEEDLES if n.encode() in data]


def files_leaking(root: Path) -> list[str]:
    return [str(p) for p in sorted(root.rglob("*")) if p.is_file() and leaks(p.read_bytes())]


def pod_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "E3PRUNE_CACHE": str(tmp / "cache"), **extra}


def e3prune_run(output: Path, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "e3prune.cli", "run", "--output", str(output), *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)


@pytest.fixture(scope="module")
def auth_server(s3_server: SeaweedS3, tmp_path_factory) -> Iterator[AuthMlflowServer]:
    (port,) = free_ports(1)
    server = AuthMlflowServer(
        port=port,
        workdir=tmp_path_factory.mktemp("mlflow-auth"),
        artifacts_destination=f"s3://{s3_server.bucket}/mlflow-auth-artifacts",
        s3_endpoint=s3_server.endpoint,
        admin_username=USER,
        admin_password=SECRET,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secret_run(auth_server: AuthMlflowServer, tmp_path_factory) -> dict:
    """One ``e3prune run`` against the password-protected server, credentials in the environment only."""
    tmp = tmp_path_factory.mktemp("secret-run")
    name = f"e3prune-secret-{uuid.uuid4().hex[:8]}"
    env = pod_env(
        tmp, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=SECRET, MLFLOW_TRACKING_TOKEN=TOKEN
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    flags += ["--mlflow-tracking-uri", auth_server.uri, "--registered-model-name", name]
    done = e3prune_run(tmp / "run", env, *flags)
    return {"done": done, "output": tmp / "run", "tmp": tmp, "name": name}


@pytest.fixture
def authed_client(auth_server: AuthMlflowServer, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.uri)  # for models:/ URIs too
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    return MlflowClient(tracking_uri=auth_server.uri, registry_uri=auth_server.uri)


def test_the_server_wants_the_password(auth_server):
    import requests

    url = f"{auth_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, auth=(USER, SECRET), timeout=10).status_code == 200


@pytest.mark.slow
def test_a_run_registers_through_the_password_protected_server(secret_run, authed_client):
    done = secret_run["done"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    version = authed_client.get_model_version_by_alias(secret_run["name"], "challenger")
    assert authed_client.get_run(version.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_the_secret_is_in_no_output_log_or_file(secret_run, auth_server):
    done = secret_run["done"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # The step logs were captured, with the executor inputs that once showed the URI's password.
    assert "detect-release" in done.stdout + done.stderr and f'"{auth_server.uri}"' in done.stdout + done.stderr
    for i, line in enumerate((done.stdout + done.stderr).splitlines()):
        assert not leaks(line), f"line {i} of e3prune run's output: {line[:300]}"
    # kfp outputs, storage, the lock file, the cache; the server's databases, config and log
    assert files_leaking(secret_run["tmp"]) == []
    assert auth_server.log_path.is_file() and files_leaking(auth_server.workdir) == []


@pytest.mark.slow
def test_the_secret_is_in_no_mlflow_record(secret_run, authed_client, tmp_path):
    assert secret_run["done"].returncode == 0
    c = authed_client
    version = c.get_model_version_by_alias(secret_run["name"], "challenger")
    run = c.get_run(version.run_id)
    model = c.get_logged_model(version.model_id) if version.model_id else None
    records = {
        "run params": run.data.params,
        "run tags": run.data.tags,
        "run metric keys": sorted(run.data.metrics),
        "version": {"source": version.source, "tags": version.tags, "description": version.description},
        "registered model": c.get_registered_model(secret_run["name"]).tags,
        "logged model": model and {"params": model.params, "tags": model.tags, "uri": model.model_uri},
    }
    for what, record in records.items():
        assert not leaks(json.dumps(record, default=str)), what
    assert "run_config.json" in {a.path for a in c.list_artifacts(run.info.run_id)}
    run_files = Path(c.download_artifacts(run.info.run_id, "", str(tmp_path / "run")))
    logged_config = json.loads((run_files / "run_config.json").read_text())
    assert logged_config["mlflow_tracking_uri"] == run.data.params["mlflow_tracking_uri"] == c.tracking_uri
    assert files_leaking(run_files) == []
    version_files = Path(_download(f"models:/{secret_run['name']}/{version.version}", tmp_path / "version"))
    assert any(version_files.rglob("*")) and files_leaking(version_files) == []


def _download(uri: str, dst: Path) -> str:
    from mlflow.artifacts import download_artifacts

    return download_artifacts(artifact_uri=uri, dst_path=str(dst))


@pytest.mark.slow
def test_the_secret_is_in_no_stored_artifact(secret_run, s3_server):
    assert secret_run["done"].returncode == 0
    s3 = client(s3_server.endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix="mlflow-auth-artifacts/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(k.endswith("run_config.json") for k in keys)
    leaking = [k for k in keys if leaks(s3.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read())]
    assert leaking == []


# ---------------------------------------------------------------- a URI with credentials is refused


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_e3prune_run_refuses_credentials_in_the_uri_naming_the_parameter(how, tmp_path):
    output = tmp_path / "run"
    if how == "flag":
        done = e3prune_run(output, pod_env(tmp_path), "--mlflow-tracking-uri", CREDENTIALED_URIS[0])
    else:
        done = e3prune_run(output, pod_env(tmp_path, MLFLOW_TRACKING_URI=CREDENTIALED_URIS[2]))
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: mlflow_tracking_uri: "), done.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in errors[0] and "MLFLOW_TRACKING_TOKEN" in errors[0]
    assert not leaks(done.stdout + done.stderr)
    assert not output.exists(), "the run started before refusing"


@pytest.mark.parametrize("uri", CREDENTIALED_URIS)
def test_the_run_config_refuses_every_form_of_credentials(uri):
    from e3prune.errors import E3PruneError
    from e3prune.run_config import RunConfig

    with pytest.raises(E3PruneError) as caught:
        RunConfig.parse(mlflow_tracking_uri=uri)
    assert caught.value.field == "mlflow_tracking_uri" and not leaks(str(caught.value))
    assert "credentials do not belong in the tracking URI" in str(caught.value)


def test_detect_release_refuses_credentials_in_the_uri(tmp_path):
    from kfp_calls import call_detect_release

    from e3prune.errors import E3PruneError

    with pytest.raises(E3PruneError) as caught:
        call_detect_release(tmp_path, mlflow_tracking_uri=CREDENTIALED_URIS[0])
    assert caught.value.field == "mlflow_tracking_uri" and str(caught.value).startswith("mlflow_tracking_uri: ")
    assert not leaks(str(caught.value)) and "http://***@127.0.0.1:1" in str(caught.value)


def test_detect_release_refuses_credentials_in_the_pods_tracking_uri(tmp_path, monkeypatch):
    from kfp_calls import call_detect_release

    from e3prune.errors import E3PruneError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", CREDENTIALED_URIS[2])
    with pytest.raises(E3PruneError) as caught:
        call_detect_release(tmp_path, mlflow_tracking_uri="")
    assert caught.value.field == "mlflow_tracking_uri" and not leaks(str(caught.value))


@pytest.mark.parametrize("uri", CREDENTIALED_URIS)
def test_register_and_promote_refuse_credentials_before_connecting(uri):
    from e3prune.errors import E3PruneError
    from e3prune.gate import PromoteConfig, promote
    from e3prune.registry import RegisterConfig, register

    calls = [
        lambda: register(RegisterConfig.parse(model_name="m", model_uri="/nonexistent", run_key="k", tracking_uri=uri)),
        lambda: promote(PromoteConfig.parse(model_name="m", tracking_uri=uri)),
    ]
    for call in calls:
        with pytest.raises(E3PruneError) as caught:
            call()
        assert caught.value.field == "mlflow_tracking_uri" and not leaks(str(caught.value))


@pytest.mark.parametrize(
    "uri",
    ["", "http://127.0.0.1:5000", "https://mlflow.example.com/mlflow/?experiment=7", "sqlite:////tmp/a@b/mlflow.db",
     "/tmp/runs@home/mlruns", "databricks://profile"],
)  # fmt: skip
def test_uris_without_credentials_are_accepted(uri):
    from e3prune.run_config import RunConfig

    assert RunConfig.parse(mlflow_tracking_uri=uri).mlflow_tracking_uri == uri
