"""A real MLflow tracking server for the tests: ``mlflow server`` on loopback, sqlite backend, artifacts on S3.

The project asks for integration tests against real servers. The registry code talks to MLflow over
its REST API exactly as a pipeline pod does: the server owns the sqlite database and proxies
artifacts (``--artifacts-destination``) to the SeaweedFS S3 server of ``s3_server.py``, so the
client never needs S3 credentials for artifacts and a source validation the server would apply
in production (e.g. to model version sources) applies here too.

The server is kept light: one uvicorn worker, and MLflow's background job runner (a huey
consumer for GenAI jobs, on by default in MLflow 3) switched off.

Fixtures (registered in ``conftest.py``):
- ``mlflow_server`` (session): the running server; ``stop()`` and ``start()`` restart it on the
  same port and database (for the "server down" tests).
- ``mlflow`` (per test): ``MLFLOW_TRACKING_URI`` set to the server and a registered-model name
  no other test uses; yields an :class:`MlflowEnv`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from s3_server import ACCESS_KEY, HOST, REGION, SECRET_KEY, SeaweedS3, free_ports, stop_process_group

START_TIMEOUT_SECONDS = 90  # two shared cores: importing mlflow and migrating sqlite takes a while
STOP_GRACE_SECONDS = 5


@dataclass
class MlflowServer:
    port: int
    workdir: Path
    artifacts_destination: str
    s3_endpoint: str
    process: subprocess.Popen | None = None
    starts: int = field(default=0)

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mlflow-server.log"

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination",
            self.artifacts_destination,
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update(
            {
                # The server, not the client, writes artifacts to S3 (proxied artifact access).
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": str(self.workdir / "aws-config-absent"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "aws-credentials-absent"),
                # No huey job consumer beside the server: nothing here uses MLflow's GenAI jobs.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "OMP_NUM_THREADS": "1",
                "TMPDIR": str(self.workdir),
            }
        )
        return env

    def start(self) -> None:
        """Start the server (again) and wait until ``/health`` answers."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts + 1} =====\n".encode())
            log.flush()
            # A session of its own: `mlflow server` starts uvicorn, which starts a worker; one
            # signal to the group reaches all three.
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        self.starts += 1
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except Exception as exc:  # noqa: BLE001 - any failure here means "not ready yet"
                last_error = exc
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not ready after {START_TIMEOUT_SECONDS}s ({last_error}):\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after a short grace; wait until the port is closed."""
        proc = self.process
        if proc is None:
            return
        stop_process_group(proc, STOP_GRACE_SECONDS)
        try:  # a worker that outlived its parent would keep the port
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None


@dataclass
class MlflowEnv:
    uri: str  # the tracking URI, also in MLFLOW_TRACKING_URI for the test
    model_name: str  # a registered-model name no other test uses
    server: MlflowServer

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="session")
def mlflow_server(s3_server: SeaweedS3, tmp_path_factory) -> Iterator[MlflowServer]:
    (port,) = free_ports(1)
    server = MlflowServer(
        port=port,
        workdir=tmp_path_factory.mktemp("mlflow"),
        artifacts_destination=f"s3://{s3_server.bucket}/mlflow-artifacts",
        s3_endpoint=s3_server.endpoint,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow(mlflow_server: MlflowServer, monkeypatch) -> Iterator[MlflowEnv]:
    """The environment of a pipeline pod that talks to this server, and a fresh model name.

    A test that stopped the server gets it started again afterwards, so the next test finds it up.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield MlflowEnv(uri=mlflow_server.uri, model_name=f"e3prune-test-{uuid.uuid4().hex[:12]}", server=mlflow_server)
    if not mlflow_server.running:
        mlflow_server.start()


@dataclass
class AuthMlflowServer(MlflowServer):
    """The same server behind MLflow's own ``basic-auth`` app: every request but ``/health`` needs a password.

    The admin user (``admin_username``, ``admin_password``) is created on the first start; a
    client authenticates with ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``. The
    app needs Flask-WTF (the ``test`` extra) and a static ``MLFLOW_FLASK_SERVER_SECRET_KEY``.
    """

    admin_username: str = "admin"
    admin_password: str = ""

    @property
    def auth_config(self) -> Path:
        return self.workdir / "basic_auth.ini"

    def command(self) -> list[str]:
        return [*super().command(), "--app-name", "basic-auth"]

    def environment(self) -> dict[str, str]:
        return {
            **super().environment(),
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.admin_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
        }

    def start(self) -> None:
        # No permission for users other than the admin; the user store beside the tracking database.
        self.auth_config.write_text(
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{self.workdir / 'basic_auth.db'}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        super().start()
