"""Fixtures shared by ``tests/`` and every ``components/<name>/tests/`` (the catalog's root conftest).

Real servers, really started: a SeaweedFS S3 server and an ``mlflow server`` process on
loopback, plus the shipped reference model. ``kfp.local`` runs steps as subprocesses of this
Python, so a step sees the same installed package and the environment the fixtures set.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tests"))

# A real `mlflow server` (sqlite backend, artifacts proxied to the S3 server below), for the registry tests.
from mlflow_server import mlflow, mlflow_server  # noqa: E402, F401

# The S3 server fixtures (a real SeaweedFS on loopback), shared by the storage and data tests.
from s3_server import s3, s3_server  # noqa: E402, F401


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    from e3prune.reference import MODEL_DIR

    assert (MODEL_DIR / "model.safetensors").is_file(), "the shipped reference model is missing"
    return MODEL_DIR


@pytest.fixture
def no_partial_dirs(tmp_path):
    """Asserts after the test that no staged (``.partial``) directory was left behind."""
    yield tmp_path
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert not leftovers, f"staged directories left behind: {leftovers}"
