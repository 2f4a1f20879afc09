"""Distillation across nodes as a Kubeflow Trainer v2 TrainJob (``e3prune.trainjob``).

No cluster here, so the real ``kubeflow`` SDK (0.5.0) drives its Kubernetes backend over HTTP
against a small local API server (the lowest level there is: the SDK's own ``kubernetes`` client
serializes and sends every request). The contract is ``kubeflow_trainer_api``, the generated
models of the Trainer's OpenAPI spec: every TrainJob the SDK sends must deserialize into
``TrainerV1alpha1TrainJob`` with no field lost (an unknown field anywhere is dropped by the model
and fails the comparison; a missing required one fails the model), and the server answers with
objects built through the same models. The requests are also checked against the endpoints the
SDK is allowed to call, and no secret value may appear in any request.

The last test runs one real TrainJob, a tiny distillation, through the SDK's local-process
backend (see its docstring for the one thing this machine lacks and how it is supplied).
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import os
import re
import socket
import sys
import threading
import time
import zipfile
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
import test_distill
from fake_http import serving
from kubeflow.trainer import KubernetesBackendConfig, LocalProcessBackendConfig, TrainerClient
from kubeflow.trainer.constants import constants as tc
from kubeflow_trainer_api import models
from kubernetes.client import Configuration

from e3prune import storage, trainjob
from e3prune.distill import DistillConfig
from e3prune.errors import E3PruneError

REPO = Path(__file__).resolve().parents[1]
# A tiny hardened student and its teacher's top-K cache over real sampled data (module fixtures).
tiny_teacher, tiny_student, tiny_cache = test_distill.tiny_teacher, test_distill.tiny_student, test_distill.tiny_cache
NS = "kubeflow-user-example-com"
IMAGE = "registry.example.com/e3-pruner:0.1.0-cuda"
RUNTIME_IMAGE = "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime"
API = "/apis/trainer.kubeflow.org/v1alpha1"
MLFLOW_PASSWORD = "mlflow-password-not-for-production"
RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# --- the contract: the Trainer's models ------------------------------------------------------


def difference(a, b, path: str = "") -> str | None:
    """The first place where ``a`` and ``b`` differ (a key one of them lacks, or a value), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            if k not in a or k not in b:
                return f"{path}.{k}"
            if (found := difference(a[k], b[k], f"{path}.{k}")) is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length)"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := difference(x, y, f"{path}[{i}]"))), None)
    if isinstance(a, datetime):  # the models parse timestamps; the wire has RFC 3339 strings
        a = a.strftime("%Y-%m-%dT%H:%M:%SZ")
    return None if a == b and type(a) is type(b) else f"{path}: {a!r} != {b!r}"


def check_against(model, body: dict) -> None:
    """``body`` is a ``model`` exactly: required fields present, types right, nothing unknown."""
    parsed = model.from_dict(copy.deepcopy(body))  # raises on missing required fields and bad types
    where = difference(parsed.to_dict(), body)
    assert where is None, f"fields outside {model.__name__} at {where}:\n{json.dumps(body, indent=1)}"


def check_trainjob(body: dict) -> None:
    check_against(models.TrainerV1alpha1TrainJob, body)
    assert body["apiVersion"] == tc.API_VERSION and body["kind"] == tc.TRAINJOB_KIND
    name = body["metadata"]["name"]
    assert RFC1035.match(name) and len(name) <= 63, name
    assert body["spec"]["runtimeRef"]["name"]


def _through(model, obj: dict) -> dict:
    """An answer as the API sends it: built through the model, so with its JSON names."""
    check_against(model, obj)
    return obj


def torch_runtime(name: str = "torch-distributed", framework: str = "torch") -> dict:
    """The ClusterTrainingRuntime Kubeflow Trainer ships (manifests/base/runtimes/torch_distributed.yaml)."""
    # In Trainer 2.3 the torch policy holds no process count (the TrainJob's numProcPerNode does).
    ml_policy = {"numNodes": 1, framework: {}}
    return _through(
        models.TrainerV1alpha1ClusterTrainingRuntime,
        {
            "apiVersion": tc.API_VERSION,
            "kind": "ClusterTrainingRuntime",
            "metadata": {"name": name, "labels": {tc.RUNTIME_FRAMEWORK_LABEL: framework}},
            "spec": {
                "mlPolicy": ml_policy,
                "template": {
                    "spec": {
                        "replicatedJobs": [
                            {
                                "name": "node",
                                "template": {
                                    "metadata": {"labels": {tc.TRAINJOB_ANCESTOR_LABEL: "trainer"}},
                                    "spec": {
                                        "template": {
                                            "spec": {
                                                "containers": [
                                                    {"name": "node", "image": RUNTIME_IMAGE, "command": ["/bin/bash"]}
                                                ]
                                            }
                                        }
                                    },
                                },
                            }
                        ]
                    }
                },
            },
        },
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }


# --- a Kubernetes API server with the Trainer's CRDs, state in dicts --------------------------

ENDPOINTS = [  # (method, path regex) of every call the SDK's Kubernetes backend may make
    ("GET", r"/api/v1/namespaces/[^/]+/configmaps/kubeflow-trainer-public"),
    ("GET", rf"{API}"),
    ("GET", rf"{API}/namespaces/[^/]+/trainingruntimes/[^/]+"),
    ("GET", rf"{API}/clustertrainingruntimes/[^/]+"),
    ("POST", rf"{API}/namespaces/[^/]+/trainjobs"),
    ("GET", rf"{API}/namespaces/[^/]+/trainjobs/[^/]+"),
    ("DELETE", rf"{API}/namespaces/[^/]+/trainjobs/[^/]+"),
    ("GET", r"/api/v1/namespaces/[^/]+/pods"),
    ("GET", r"/api/v1/namespaces/[^/]+/pods/[^/]+/log"),
]


class FakeKube:
    """The Kubernetes API as the Trainer SDK sees it. A test drives a job's life through hooks:
    ``on_create(name)`` after a TrainJob is created, ``on_log_end(pod)`` after a log was streamed."""

    def __init__(self):
        self.requests: list[SimpleNamespace] = []
        self.crd_installed = True
        self.runtimes: dict[str, dict] = {"torch-distributed": torch_runtime()}
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, list[dict]] = {}
        self.logs: dict[str, str] = {}
        self.refuse: dict[tuple[str, str], tuple[int, str]] = {}  # (method, path regex) -> (status, message)
        self.on_create = lambda name: None
        self.on_log_end = lambda pod: None
        self.lock = threading.RLock()

    # state helpers for the tests
    def add_job(self, body: dict) -> None:
        body = copy.deepcopy(body)
        body["metadata"].update(namespace=NS, creationTimestamp=_now(), uid=f"uid-{len(self.jobs)}")
        self.jobs[body["metadata"]["name"]] = _through(models.TrainerV1alpha1TrainJob, body)

    def set_pods(self, job: str, nodes: int, phase: str, *, gpus: int = 8, failed: dict | None = None) -> None:
        """``nodes`` pods of the job's node ReplicatedJob in ``phase``; ``failed``: index -> (reason, exit)."""
        pods = []
        for i in range(nodes):
            state = {"running": {"startedAt": _now()}}
            if (failed or {}).get(i):
                reason, code = failed[i]
                state = {"terminated": {"reason": reason, "exitCode": code, "finishedAt": _now()}}
            pods.append(
                _through(
                    models.IoK8sApiCoreV1Pod,
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            "name": f"{job}-node-0-{i}-x7k2p",
                            "namespace": NS,
                            "creationTimestamp": _now(),
                            "labels": {
                                tc.JOBSET_NAME_LABEL: job,
                                tc.JOBSET_RJOB_NAME_LABEL: "node",
                                tc.JOB_INDEX_LABEL: str(i),
                            },
                        },
                        "spec": {
                            "containers": [
                                {"name": "node", "image": IMAGE, "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
                            ]
                        },
                        "status": {
                            "phase": phase,
                            "containerStatuses": [
                                {
                                    "name": "node",
                                    "image": IMAGE,
                                    "imageID": "",
                                    "ready": phase == "Running",
                                    "restartCount": 0,
                                    "state": state,
                                }
                            ],
                        },
                    },
                )
            )
        self.pods[job] = pods

    def set_condition(self, job: str, kind: str, reason: str, message: str) -> None:
        self.jobs[job]["status"] = {
            "conditions": [
                {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()}
            ]
        }

    def calls(self, method: str, pattern: str) -> list[SimpleNamespace]:
        return [r for r in self.requests if r.method == method and re.fullmatch(pattern, r.path)]

    # routing
    def handle(self, method: str, path: str, query: dict[str, str], body: bytes) -> tuple[int, dict | str]:
        segs = path.strip("/").split("/")
        for (m, pattern), (code, message) in self.refuse.items():
            if m == method and re.fullmatch(pattern, path):
                return code, _status(code, "Forbidden" if code == 403 else "Invalid", message)
        if path.endswith("/configmaps/kubeflow-trainer-public"):
            return 200, {"apiVersion": "v1", "kind": "ConfigMap", "data": {"kubeflow_trainer_version": "v2.3.0"}}
        if path == API:
            if not self.crd_installed:
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            resources = [
                {"name": plural, "singularName": plural[:-1], "namespaced": namespaced, "kind": kind, "verbs": ["get"]}
                for plural, kind, namespaced in (
                    ("trainjobs", "TrainJob", True),
                    ("trainingruntimes", "TrainingRuntime", True),
                    ("clustertrainingruntimes", "ClusterTrainingRuntime", False),
                )
            ]
            return 200, {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": tc.API_VERSION,
                "resources": resources,
            }
        if re.fullmatch(rf"{API}/namespaces/[^/]+/trainingruntimes/[^/]+", path):
            return 404, _status(404, "NotFound", f'trainingruntimes.trainer.kubeflow.org "{segs[-1]}" not found')
        if re.fullmatch(rf"{API}/clustertrainingruntimes/[^/]+", path):
            if segs[-1] not in self.runtimes:
                return 404, _status(
                    404, "NotFound", f'clustertrainingruntimes.trainer.kubeflow.org "{segs[-1]}" not found'
                )
            return 200, self.runtimes[segs[-1]]
        if method == "POST" and path.endswith("/trainjobs"):
            new = json.loads(body)
            check_trainjob(new)
            name = new["metadata"]["name"]
            if name in self.jobs:
                return 409, _status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
            self.add_job(new)
            self.on_create(name)
            return 201, self.jobs[name]
        if re.fullmatch(rf"{API}/namespaces/[^/]+/trainjobs/[^/]+", path):
            name = segs[-1]
            if name not in self.jobs:
                return 404, _status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            if method == "DELETE":
                del self.jobs[name]
                self.pods.pop(name, None)
                return 200, _status(200, "", "")
            return 200, self.jobs[name]
        if re.fullmatch(r"/api/v1/namespaces/[^/]+/pods", path):
            selector = query.get("labelSelector", "")
            job = re.match(rf"{re.escape(tc.JOBSET_NAME_LABEL)}=([^,]+)", selector)
            items = self.pods.get(job.group(1), []) if job else []
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
        if re.fullmatch(r"/api/v1/namespaces/[^/]+/pods/[^/]+/log", path):
            assert query.get("container") == "node", query
            return 200, self.logs.get(segs[-2], "")
        return 404, _status(404, "NotFound", f"the fake server does not answer {method} {path}")


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube

    def _serve(self):
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.kube.lock:
            self.kube.requests.append(SimpleNamespace(method=self.command, path=url.path, query=query, body=body))
            status, answer = self.kube.handle(self.command, url.path, query, body)
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        if url.path.endswith("/log"):
            with self.kube.lock:
                self.kube.on_log_end(url.path.split("/")[-2])

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def kube():
    fake = FakeKube()
    with serving(_Handler, kube=fake) as fake.url:
        yield fake
    for r in fake.requests:  # every request is one the SDK's backend is meant to make
        assert any(r.method == m and re.fullmatch(p, r.path) for m, p in ENDPOINTS), f"{r.method} {r.path}"


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    monkeypatch.setattr(trainjob, "POLL_SECONDS", 1)
    monkeypatch.setattr(trainjob, "START_TIMEOUT_SECONDS", 60)


def client_for(kube: FakeKube) -> TrainerClient:
    return TrainerClient(KubernetesBackendConfig(namespace=NS, client_configuration=Configuration(host=kube.url)))


def s3_cfg(s3, **kw) -> DistillConfig:
    return DistillConfig(student=s3.uri("hardened"), teacher_cache=s3.uri("teacher"), output=s3.uri("distilled"), **kw)


SUMMARY = {"format_version": 1, "steps": 2, "tokens": 1024, "num_processes": 16, "final": {"loss": 1.5}}


def write_output(uri: str, summary: dict = SUMMARY) -> None:
    """What distill on the nodes writes (rank 0), published with its marker."""
    with storage.output_dir(uri) as out:
        (out / "distillation.json").write_text(json.dumps(summary))
        (out / "model.safetensors").write_bytes(b"weights")


def succeeds(
    kube: FakeKube, output: str, nodes: int, log_text: str = "INFO step 1/2 loss 2.0\nINFO step 2/2 loss 1.5\n"
):
    """Pods start on creation; when node 0's log has been read the job writes its output and completes."""

    def on_create(name):
        kube.set_pods(name, nodes, "Running")
        kube.logs[kube.pods[name][0]["metadata"]["name"]] = log_text

    def on_log_end(pod):
        name = next(n for n, pods in kube.pods.items() if pods and pods[0]["metadata"]["name"] == pod)
        write_output(output)
        kube.set_pods(name, nodes, "Succeeded")
        kube.set_condition(name, "Complete", "JobSetCompleted", "jobset completed")

    kube.on_create, kube.on_log_end = on_create, on_log_end


def embedded_script(command: list[str]) -> str:
    """The Python script the SDK writes into the container: its here-document."""
    shell = command[-1]
    return shell.split("<< EOM\n", 1)[1].rsplit("\nEOM", 1)[0]


# --- (a) the request body -----------------------------------------------------------------------


def test_submits_a_valid_trainjob_streams_its_log_and_returns_the_summary(kube, s3, monkeypatch):
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)  # the machine's own; the S3 server here is plain HTTP
    for var in [v for v in os.environ if v.startswith("HF_")]:  # e.g. lm_eval's import sets HF_XET_HIGH_PERFORMANCE
        monkeypatch.delenv(var)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.mlops.svc")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlops.svc:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/eks.amazonaws.com/token")
    cfg = s3_cfg(s3, distill_tokens=1024)
    succeeds(kube, cfg.output, nodes=2)
    lines: list[str] = []

    summary = trainjob.run_distill_trainjob(
        cfg,
        image=IMAGE,
        log=lines.append,
        client=client_for(kube),
        nodes=2,
        processes_per_node=8,
        resources_per_node={"gpu": 8, "cpu": 32, "memory": "900Gi"},
    )

    assert summary == SUMMARY
    posts = kube.calls("POST", rf"{API}/namespaces/{NS}/trainjobs")
    assert len(posts) == 1
    body = json.loads(posts[0].body)  # already checked against TrainerV1alpha1TrainJob by the server
    name = trainjob.job_name(cfg.output)
    assert body["metadata"]["name"] == name and name.startswith("e3-distill-") and len(name) == 27
    assert body["metadata"]["annotations"] == {
        trainjob.OUTPUT_ANNOTATION: cfg.output,
        trainjob.CONFIG_ANNOTATION: trainjob.config_digest(cfg.model_dump(mode="json")),
    }
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    t = spec["trainer"]
    assert t["numNodes"] == 2 and t["image"] == IMAGE
    assert t["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8, "cpu": 32, "memory": "900Gi"}
    assert t["resourcesPerNode"]["requests"] == t["resourcesPerNode"]["limits"]
    # plain settings by value; secrets by reference to the pipeline's Secret; the step's IRSA paths not at all
    env = {e["name"]: e["value"] for e in t["env"]}
    assert set(env) - set(trainjob.FSDP_ENV) == {"AWS_ENDPOINT_URL", "AWS_REGION", "AWS_CONFIG_FILE",
                                                 "AWS_SHARED_CREDENTIALS_FILE", "MLFLOW_TRACKING_URI",
                                                 "HF_ENDPOINT"}  # fmt: skip
    assert {k: env[k] for k in trainjob.FSDP_ENV} == trainjob.FSDP_ENV  # GPUs: FSDP, as fsdp_gpu.yaml
    container = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert container["name"] == "node"
    pod = container["template"]["spec"]["template"]["spec"]
    node = pod["containers"][0]
    assert node["name"] == "node"
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in node["env"]} == {
        k: {"name": "e3-pruner-s3", "key": k, "optional": True}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")
    }
    assert node["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    # the function runs under torchrun, with the settings as keyword arguments
    assert t["command"][:2] == ["bash", "-c"] and 'torchrun "' in t["command"][-1]
    script = embedded_script(t["command"])
    tree = ast.parse(script)
    assert [n.name for n in tree.body if isinstance(n, ast.FunctionDef)] == ["distill_on_trainjob"]
    call = tree.body[-1].value
    assert call.func.id == "distill_on_trainjob" and ast.literal_eval(call.keywords[0].value) == cfg.model_dump(
        mode="json"
    )
    # no secret value in any request, nor in what the step logged
    secrets = (s3.client._request_signer._credentials.secret_key, MLFLOW_PASSWORD)
    for r in kube.requests:
        assert not any(s.encode() in r.body for s in secrets), r.path
    assert not any(s in line for s in secrets for line in lines)
    # the log was streamed into `log`, and the step said what it did
    assert "INFO step 2/2 loss 1.5" in lines
    assert any(line.startswith(f"submitted TrainJob {name}: 2 node(s)") for line in lines)
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD from Secret e3-pruner-s3" in "\n".join(
        lines
    )


def test_the_contract_check_can_fail():
    """The server's schema check refuses an unknown field at any depth and a missing required one."""
    good = {
        "apiVersion": tc.API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": "e3-distill-0123456789abcdef"},
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}},
    }
    check_trainjob(good)
    unknown = copy.deepcopy(good)
    unknown["spec"]["trainer"]["numProcsPerNode"] = 8  # a typo of numProcPerNode
    with pytest.raises(AssertionError, match="fields outside"):
        check_trainjob(unknown)
    missing = copy.deepcopy(good)
    del missing["spec"]["runtimeRef"]
    with pytest.raises(ValueError):  # pydantic's ValidationError
        check_trainjob(missing)
    bad_name = copy.deepcopy(good)
    bad_name["metadata"]["name"] = "9-starts-with-a-digit"
    with pytest.raises(AssertionError):
        check_trainjob(bad_name)


def test_fsdp_settings_are_those_of_the_shipped_accelerate_config():
    """The environment ``accelerate launch --config_file configs/accelerate/fsdp_gpu.yaml`` gives
    its processes (accelerate's own translation) is what the TrainJob's GPU nodes get."""
    import yaml
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = REPO / "configs/accelerate/fsdp_gpu.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert yaml.safe_load(config.read_text())["distributed_type"] == "FSDP"
    assert {k: env[k] for k in trainjob.FSDP_ENV} == trainjob.FSDP_ENV


def test_job_names_are_deterministic_labels():
    a = trainjob.job_name("s3://b/work/distill/" + "k" * 200)
    assert a == trainjob.job_name("s3://b/work/distill/" + "k" * 200 + "/")
    assert a != trainjob.job_name("s3://b/work/distill/other")
    assert RFC1035.match(a) and len(a) <= 63


def test_secret_names_agree_with_the_pipeline():
    """The pods read secrets from the Secret the steps read them from, and every key the pipeline
    mounts from it is passed by reference, every ConfigMap key by value."""
    consts = {
        t.id: ast.literal_eval(node.value) if not isinstance(node.value, ast.DictComp) else None
        for node in ast.parse((REPO / "pipelines/e3_pruner/cluster.py").read_text()).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and t.id == "S3_SECRET"
    }
    assert consts["S3_SECRET"] == trainjob.CREDENTIALS_SECRET
    source = (REPO / "pipelines/e3_pruner/cluster.py").read_text()
    secret_keys = re.findall(r'"([A-Z_]+)"', source.split("SECRET_KEYS = {", 1)[1].split("}", 1)[0])
    config_keys = re.findall(r'"([A-Z_]+)"', source.split("CONFIG_KEYS = {", 1)[1].split("}", 1)[0])
    assert len(secret_keys) == 6 and len(config_keys) == 4
    plain, secret = trainjob.forwarded_env({k: "x" for k in (*secret_keys, *config_keys)})
    assert sorted(secret) == sorted(secret_keys) and sorted(plain) == sorted(config_keys)


# --- retries --------------------------------------------------------------------------------


def _existing(kube: FakeKube, cfg: DistillConfig, *, digest: str | None = None) -> str:
    name = trainjob.job_name(cfg.output)
    kube.add_job(
        {
            "apiVersion": tc.API_VERSION,
            "kind": "TrainJob",
            "metadata": {
                "name": name,
                "annotations": {
                    trainjob.CONFIG_ANNOTATION: digest or trainjob.config_digest(cfg.model_dump(mode="json"))
                },
            },
            "spec": {
                "runtimeRef": {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"},
                "trainer": {"numNodes": 2},
            },
        }
    )
    return name


def test_a_retry_attaches_to_the_running_job_instead_of_submitting_another(kube, s3):
    cfg = s3_cfg(s3)
    name = _existing(kube, cfg)
    succeeds(kube, cfg.output, nodes=2, log_text="INFO resumed at step 1\nINFO step 2/2 loss 1.5\n")
    kube.on_create(name)  # its pods are running
    lines: list[str] = []
    summary = trainjob.run_distill_trainjob(cfg, image=IMAGE, log=lines.append, client=client_for(kube), nodes=2)
    assert summary == SUMMARY
    assert not kube.calls("POST", rf"{API}/namespaces/{NS}/trainjobs")
    assert not kube.calls("DELETE", rf"{API}/namespaces/{NS}/trainjobs/{name}")
    assert any("attaching to the running TrainJob" in line for line in lines)
    assert "INFO resumed at step 1" in lines


def test_a_retry_after_a_failed_job_deletes_it_and_submits_again(kube, s3):
    cfg = s3_cfg(s3)
    name = _existing(kube, cfg)
    kube.set_condition(name, "Failed", "JobSetFailed", "jobset failed")
    succeeds(kube, cfg.output, nodes=2)
    lines: list[str] = []
    assert (
        trainjob.run_distill_trainjob(cfg, image=IMAGE, log=lines.append, client=client_for(kube), nodes=2) == SUMMARY
    )
    methods = [r.method for r in kube.requests if "/trainjobs" in r.path and r.method != "GET"]
    assert methods == ["DELETE", "POST"]
    assert any("ended Failed; deleting it and submitting again" in line for line in lines)


def test_a_retry_after_a_complete_job_uses_its_output(kube, s3):
    cfg = s3_cfg(s3)
    name = _existing(kube, cfg)
    kube.set_condition(name, "Complete", "JobSetCompleted", "done")
    write_output(cfg.output)
    assert (
        trainjob.run_distill_trainjob(cfg, image=IMAGE, log=lambda s: None, client=client_for(kube), nodes=2) == SUMMARY
    )
    assert [r.method for r in kube.requests if "/trainjobs" in r.path and r.method != "GET"] == []


def test_a_running_job_with_other_settings_is_not_attached_to(kube, s3):
    cfg = s3_cfg(s3)
    name = _existing(kube, cfg, digest="0" * 32)
    kube.set_pods(name, 2, "Running")
    with pytest.raises(
        E3PruneError, match=f"TrainJob {name} is already distilling into .* with other settings"
    ) as info:
        trainjob.run_distill_trainjob(cfg, image=IMAGE, log=lambda s: None, client=client_for(kube), nodes=2)
    assert info.value.field == "output"
    assert not kube.calls("POST", rf"{API}/namespaces/{NS}/trainjobs")


# --- (c) failures -----------------------------------------------------------------------------


def test_a_failed_job_raises_with_its_condition_pods_and_log(kube, s3):
    cfg = s3_cfg(s3)
    traceback = "Traceback (most recent call last):\n  ...\ntorch.distributed.DistBackendError: NCCL error: unhandled system error\n"

    def on_create(name):
        kube.set_pods(name, 2, "Running")
        kube.logs[kube.pods[name][0]["metadata"]["name"]] = "INFO step 1/2 loss 2.0\n" + traceback

    def on_log_end(pod):
        name = next(iter(kube.jobs))
        kube.set_pods(name, 2, "Failed", failed={0: ("Error", 1), 1: ("OOMKilled", 137)})
        kube.set_condition(name, "Failed", "JobSetFailed", "jobset failed: FailedJobs: [node]")

    kube.on_create, kube.on_log_end = on_create, on_log_end
    with pytest.raises(E3PruneError) as info:
        trainjob.run_distill_trainjob(cfg, image=IMAGE, log=lambda s: None, client=client_for(kube), nodes=2)
    msg = str(info.value)
    name = trainjob.job_name(cfg.output)
    assert msg.startswith(f"TrainJob {name} failed; JobSetFailed: jobset failed: FailedJobs: [node]")
    assert f"pod {name}-node-0-1-x7k2p: OOMKilled (exit 137)" in msg
    assert "NCCL error: unhandled system error" in msg


def test_distills_own_error_comes_back_with_its_field(kube, s3):
    cfg = s3_cfg(s3)
    marker = trainjob.ERROR_MARKER + json.dumps({"field": "teacher_cache", "message": "has no distill split"})

    def on_create(name):
        kube.set_pods(name, 2, "Running")
        kube.logs[kube.pods[name][0]["metadata"]["name"]] = f"{marker}\nTraceback ...\nE3PruneError: ...\n"

    def on_log_end(pod):
        name = next(iter(kube.jobs))
        kube.set_pods(name, 2, "Failed", failed={0: ("Error", 1)})
        kube.set_condition(name, "Failed", "JobSetFailed", "jobset failed")

    kube.on_create, kube.on_log_end = on_create, on_log_end
    with pytest.raises(E3PruneError) as info:
        trainjob.run_distill_trainjob(cfg, image=IMAGE, log=lambda s: None, client=client_for(kube), nodes=2)
    assert info.value.field == "teacher_cache"
    assert str(info.value) == f"teacher_cache: TrainJob {trainjob.job_name(cfg.output)} failed: has no distill split"


@pytest.mark.parametrize("field", ["output", "checkpoint_dir", "student", "teacher_cache"])
def test_local_paths_are_refused_before_anything_is_sent(kube, s3, tmp_path, field):
    cfg = s3_cfg(s3).model_copy(update={field: str(tmp_path / field)})
    with pytest.raises(E3PruneError, match="needs shared storage every node reaches: an s3:// URI") as info:
        trainjob.run_distill_trainjob(cfg, image=IMAGE, log=lambda s: None, client=client_for(kube), nodes=2)
    assert info.value.field == field
    assert not [r for r in kube.requests if "trainjobs" in r.path or "runtimes" in r.path]


def test_processes_must_match_the_gpus_of_a_node(kube, s3):
    with pytest.raises(E3PruneError, match="one process per GPU") as info:
        trainjob.run_distill_trainjob(
            s3_cfg(s3), image=IMAGE, client=client_for(kube), nodes=2, processes_per_node=4,
            resources_per_node={"gpu": 8},
        )  # fmt: skip
    assert info.value.field == "distill_processes"


def test_nodes_and_processes_come_from_the_config_when_it_has_them(kube, s3):
    """Without keyword arguments the counts are DistillConfig.nodes / .processes (distill_nodes / distill_processes)."""
    cfg = s3_cfg(s3, nodes=3, processes=2)
    succeeds(kube, cfg.output, nodes=3)
    trainjob.run_distill_trainjob(cfg, image=IMAGE, log=lambda s: None, client=client_for(kube))
    t = json.loads(kube.calls("POST", rf"{API}/namespaces/{NS}/trainjobs")[0].body)["spec"]["trainer"]
    assert t["numNodes"] == 3 and t["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 2}


# --- (b) is a Trainer there? ----------------------------------------------------------------------


def test_no_kube_config_and_no_in_cluster_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert not Path("/var/run/secrets/kubernetes.io").exists()  # this machine is not a pod
    with pytest.raises(E3PruneError) as info:
        trainjob.check_trainer_available()
    assert info.value.field == "distill_nodes"
    assert "no Kubernetes credentials to submit a Kubeflow TrainJob: no kube config" in str(info.value)
    assert str(info.value).endswith("or set distill_nodes to 1")


def test_no_trainjob_crd(kube):
    kube.crd_installed = False
    with pytest.raises(E3PruneError, match="has no TrainJob resource .*Kubeflow Trainer v2 is not installed") as info:
        trainjob.check_trainer_available(client_for(kube))
    assert info.value.field == "distill_nodes"


def test_no_torch_runtime(kube):
    kube.runtimes.clear()
    with pytest.raises(E3PruneError, match="no TrainingRuntime 'torch-distributed' in namespace") as info:
        trainjob.check_trainer_available(client_for(kube))
    assert info.value.field == "distill_nodes"


def test_a_runtime_without_torchrun(kube):
    kube.runtimes["torch-distributed"] = torch_runtime(framework="jax")
    with pytest.raises(E3PruneError, match="does not start torchrun") as info:
        trainjob.check_trainer_available(client_for(kube))
    assert info.value.field == "distill_nodes"


def test_an_unreachable_api_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    client = TrainerClient(
        KubernetesBackendConfig(namespace=NS, client_configuration=Configuration(host=f"http://127.0.0.1:{port}"))
    )
    client.backend.custom_api.api_client.configuration.retries = 0
    with pytest.raises(E3PruneError, match="is unreachable") as info:
        trainjob.check_trainer_available(client)
    assert info.value.field == "distill_nodes"


def test_rbac_refusal_names_the_missing_rights(kube):
    kube.refuse[("GET", rf"{API}/namespaces/[^/]+/trainingruntimes/[^/]+")] = (
        403,
        'trainingruntimes.trainer.kubeflow.org "torch-distributed" is forbidden: User '
        '"system:serviceaccount:kubeflow-user-example-com:default-editor" cannot get resource "trainingruntimes"',
    )
    with pytest.raises(E3PruneError) as info:
        trainjob.check_trainer_available(client_for(kube))
    assert info.value.field == "distill_nodes"
    assert "cannot read the training runtime 'torch-distributed': HTTP 403" in str(info.value)
    assert "cannot get resource" in str(info.value) and "needs the Role in docs/operations.md" in str(info.value)


def test_a_trainjob_the_webhook_refuses_fails_with_its_message(kube, s3):
    message = 'TrainJob.trainer.kubeflow.org "x" is invalid: spec.runtimePatches: Forbidden: unsupported field'
    kube.refuse[("POST", rf"{API}/namespaces/[^/]+/trainjobs")] = (422, message)
    with pytest.raises(E3PruneError) as info:
        trainjob.run_distill_trainjob(s3_cfg(s3), image=IMAGE, log=lambda s: None, client=client_for(kube), nodes=2)
    assert info.value.field == "distill_nodes"
    assert f"could not be created: HTTP 422 {message}" in str(info.value)


def test_a_complete_trainer_passes(kube):
    trainjob.check_trainer_available(client_for(kube))
    assert [r.path for r in kube.requests][-2:] == [
        f"{API}/namespaces/{NS}/trainingruntimes/torch-distributed",
        f"{API}/clustertrainingruntimes/torch-distributed",
    ]


# --- (d) one real TrainJob through the SDK's local-process backend ------------------------------


def _torchrun_wheel(index: Path) -> None:
    """A wheel that installs only a ``torchrun`` console script, in a PEP 503 index on disk."""
    name, version = "e3prune-test-torchrun", "0.1"
    dist = f"e3prune_test_torchrun-{version}"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}.dist-info/entry_points.txt": "[console_scripts]\ntorchrun = torch.distributed.run:main\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{dist}.dist-info/RECORD"])
    (index / name).mkdir(parents=True)
    wheel = f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(index / name / wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    (index / name / "index.html").write_text(f'<html><body><a href="{wheel}">{wheel}</a></body></html>\n')


def _host_python(bin_dir: Path) -> Path:
    """A directory with only ``python``, the base interpreter of this one: the SDK creates the
    job's venv from ``which python``, and no other tool of this machine's venvs may be on PATH."""
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    return bin_dir


def _host_site_packages(site: Path) -> Path:
    """This interpreter's installed packages, but not pip: with pip visible, the job's
    ``ensurepip`` would find it satisfied and install no pip into the job's venv."""
    site.mkdir()
    for root in (Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()):
        for entry in root.iterdir():
            if entry.name.split("-")[0] in ("pip", "__pycache__") or entry.suffix == ".pth":
                continue
            if not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return site


class OfflineLocalClient(TrainerClient):
    """The SDK's local-process backend, given what this offline machine cannot download.

    The backend (kubeflow 0.5.0) creates a fresh venv without site packages, runs
    ``pip install --index-url <pip_index_urls[0]> torch <packages_to_install>`` into it only when
    ``packages_to_install`` is set, then starts ``<venv>/bin/torchrun``. Here there is no network
    and no image: torch, e3prune and the rest come from this interpreter's packages (``PYTHONPATH``,
    so pip finds torch already satisfied) and the only thing installed is the ``torchrun`` script,
    from a wheel in a local index. Everything else — the venv, the generated script, torchrun, the function — is the
    SDK's own path.
    """

    index: Path

    def train(self, runtime=None, initializer=None, trainer=None, options=None):
        trainer.packages_to_install = ["e3prune-test-torchrun"]
        trainer.pip_index_urls = [self.index.as_uri()]
        return super().train(runtime=runtime, initializer=initializer, trainer=trainer, options=options)


def test_one_real_trainjob_through_the_local_process_backend(tiny_student, tiny_cache, tmp_path, monkeypatch):
    """A real tiny distillation (2 steps) run by torchrun in the SDK's local-process backend, on 2
    processes (PET_NPROC_PER_NODE, torchrun's own variable), so the Accelerator forms a gloo group
    from torchrun's environment; the summary comes back through e3prune.storage."""
    index = tmp_path / "index"
    _torchrun_wheel(index)
    monkeypatch.setenv("PATH", f"{_host_python(tmp_path / 'bin')}:/usr/bin:/bin")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{_host_site_packages(tmp_path / 'site')}")
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("PET_MASTER_PORT", str(s.getsockname()[1]))  # not torchrun's 29500: the machine is shared
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    client = OfflineLocalClient(LocalProcessBackendConfig(cleanup_venv=True))
    client.index = index
    cfg = DistillConfig(
        student=str(tiny_student), teacher_cache=str(tiny_cache), output=str(tmp_path / "distilled"),
        distill_tokens=2 * 4 * 32, batch_size=2, checkpoint_every_steps=1, learning_rate=3e-3,
    )  # fmt: skip
    lines: list[str] = []
    started = time.monotonic()
    summary = trainjob.run_distill_trainjob(cfg, image="local", log=lines.append, client=client)
    seconds = time.monotonic() - started
    print(f"local-process TrainJob: {seconds:.1f} s")
    assert summary == json.loads((tmp_path / "distilled" / "distillation.json").read_text())
    assert summary["steps"] == 2 and summary["num_processes"] == 2 and summary["final"]["loss"] > 0
    assert (tmp_path / "distilled" / "model.safetensors").is_file()
    assert any("distilled 2 steps" in line for line in lines), lines[-20:]
    assert not (tmp_path / "distilled.ckpt").exists()
    with pytest.raises(importlib.metadata.PackageNotFoundError):  # installed into the job's venv, not this one
        importlib.metadata.version("e3prune-test-torchrun")


def test_the_local_backend_refuses_more_than_one_node(tmp_path):
    cfg = DistillConfig(student=str(tmp_path / "s"), teacher_cache=str(tmp_path / "c"), output=str(tmp_path / "o"))
    with pytest.raises(E3PruneError, match="local-process backend runs one node") as info:
        trainjob.run_distill_trainjob(cfg, image="local", client=TrainerClient(LocalProcessBackendConfig()), nodes=2)
    assert info.value.field == "distill_nodes"
