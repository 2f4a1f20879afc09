"""Distillation across nodes: the distill step as a Kubeflow Trainer v2 TrainJob.

When ``distill_nodes`` > 1 the distill step does not train in its own pod: it submits a TrainJob
through the ``kubeflow`` SDK (``TrainerClient``, ``CustomTrainer``) that runs
:func:`distill_on_trainjob` on every node, streams node 0's log into the step's log, waits for the
job and returns the summary the job wrote (``distillation.json`` under ``cfg.output``). See
docs/operations.md, "Distillation across nodes (Kubeflow Trainer)".

How the SDK runs it (kubeflow 0.5.0, read from its source): it ships the *source* of the function
and calls it with ``func_args`` unpacked as keyword arguments (the local-process backend passes
them as one positional dict instead, so the function takes both). On a runtime whose ML policy is
``torch`` (``torch-distributed``) the container command is ``torchrun <script>``; the Trainer
injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT``, which torchrun reads as its flags. torchrun then sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT`` for
every process, which is exactly what ``accelerate.Accelerator`` reads (``env://``
rendezvous: NCCL on GPUs, gloo on CPUs) and what ``e3prune.distill._nodes`` divides.

Retries. The job's name is derived from the output URI (``job_name``), which the component keys
by its inputs, so a retried task finds the job of its first attempt:

- running or pending, with the same settings: attach to it (stream its log, wait), never submit
  a second one for the same work;
- complete, and the output is complete: use its result;
- failed (or complete without a complete output): delete it and submit it again; the new job
  resumes from the checkpoints at ``cfg.checkpoint_location()``, which the same output keeps;
- running with *other* settings (a hand-run with the same output): refuse, naming the job.

Credentials. The step's ``AWS_*``, ``MLFLOW_*`` and ``HF_*`` variables reach the training
containers: plain settings (endpoint, region, tracking URI) by value through the trainer's
``env``; secrets (keys, tokens, passwords, user names) only by reference, as ``secretKeyRef``
to the Secret the pipeline's steps read them from (:data:`CREDENTIALS_SECRET`), so no secret value
is written into the TrainJob object, printed or logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from e3prune import storage
from e3prune.errors import E3PruneError

logger = logging.getLogger(__name__)

RUNTIME = "torch-distributed"
# The Secret the pipeline's steps read their credentials from (pipelines/e3_pruner/cluster.py,
# S3_SECRET; tests/test_trainjob.py checks they agree). The training pods read the same keys.
CREDENTIALS_SECRET = "e3-pruner-s3"
NAME_PREFIX = "e3-distill-"
FORWARDED_PREFIXES = ("AWS_", "MLFLOW_", "HF_")
# Values that must not be written into the TrainJob: by reference to CREDENTIALS_SECRET.
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|USERNAME|ACCESS_KEY|_KEY_ID)")
# Set by IRSA / EKS Pod Identity for the step's own service account: paths and endpoints that
# mean nothing in another pod (the runtime's pods get their own when their account has the role).
_POD_IDENTITY = frozenset(
    {
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    }
)
# On GPU nodes the job trains as `accelerate launch --config_file configs/accelerate/fsdp_gpu.yaml`
# would: the runtime starts plain torchrun, so the settings that launcher passes as environment
# variables are passed here (the Accelerator reads them; tests/test_trainjob.py checks they match
# the file). Without them every GPU would hold the whole student and its AdamW states (DDP).
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
    "FSDP_SYNC_MODULE_STATES": "true",  # accelerate requires it with cpu_ram_efficient_loading
    "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "ACCELERATE_MIXED_PRECISION": "bf16",
}
# The training function prints one line with this prefix when distill refuses its input, so the
# step reports the same field and message as a local run.
ERROR_MARKER = "E3PRUNE_TRAINJOB_ERROR "
CONFIG_ANNOTATION = "e3prune.io/config-sha256"
OUTPUT_ANNOTATION = "e3prune.io/output"
POLL_SECONDS = 10
START_TIMEOUT_SECONDS = 24 * 3600  # pods may wait long for 8-GPU nodes; the KFP task's own timeout still applies
RUN_TIMEOUT_SECONDS = 14 * 24 * 3600
DELETE_TIMEOUT_SECONDS = 600
LOG_TAIL_LINES = 20
NODE_STEP = "node-0"

# Trainer statuses, as the SDK reports them (kubeflow.trainer.constants).
CREATED, RUNNING, COMPLETE, FAILED = "Created", "Running", "Complete", "Failed"


# --------------------------------------------------------------------------- on the training nodes


def distill_on_trainjob(config: dict | None = None, **fields):
    """Kubeflow Trainer entry point: run on every rank by the runtime's torchrun.

    Self-contained: the SDK runs this function's source in a fresh script, so it imports what it
    needs here; the image must have e3prune installed. The Kubernetes backend calls it with the
    settings as keyword arguments, the local-process backend with one dict: both are accepted.
    The source must hold no dollar sign, backquote or backslash: the SDK embeds it in an
    unquoted shell here-document.
    """
    import json
    import logging
    import sys

    from e3prune.distill import DistillConfig, distill
    from e3prune.errors import E3PruneError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return distill(DistillConfig.parse({**(config or {}), **fields}))
    except E3PruneError as exc:
        message = str(exc).removeprefix(f"{exc.field}: ") if exc.field else str(exc)
        line = json.dumps({"field": exc.field, "message": message})
        print("E3PRUNE_TRAINJOB_ERROR " + line, file=sys.stderr, flush=True)
        raise


# --------------------------------------------------------------------------- in the distill step


def check_trainer_available(client=None, *, runtime: str = RUNTIME) -> None:
    """Raise ``E3PruneError(..., field="distill_nodes")`` with one clear message when no Kubeflow
    Trainer can be used: no kube config or in-cluster credentials, the TrainJob CRD absent, the
    runtime absent or not a torch runtime. Called before any weights load."""
    client = client if client is not None else _trainer_client()
    if _is_local(client):
        return  # the local-process backend needs no cluster (one node, this machine)
    from kubeflow.trainer.constants import constants
    from kubernetes.client.exceptions import ApiException

    backend = client.backend
    where = f"the Kubernetes API at {backend.custom_api.api_client.configuration.host}"
    try:
        found = backend.custom_api.get_api_resources(constants.GROUP, constants.VERSION)
        kinds = {r.name for r in found.resources or []}
    except ApiException as exc:
        if exc.status == 404:
            kinds = set()
        else:
            raise _unavailable(
                f"{where} refused the API discovery of {constants.API_VERSION}: {_status(exc)}"
            ) from None
    except Exception as exc:  # urllib3 connection errors: the server is unreachable
        raise _unavailable(f"{where} is unreachable: {type(exc).__name__}: {exc}") from None
    if constants.TRAINJOB_PLURAL not in kinds:
        raise _unavailable(
            f"{where} has no TrainJob resource ({constants.TRAINJOB_PLURAL}.{constants.GROUP}/{constants.VERSION}): "
            "Kubeflow Trainer v2 is not installed in this cluster"
        )
    try:
        found_runtime = client.get_runtime(runtime)
    except (RuntimeError, TimeoutError) as exc:
        cause = exc.__cause__
        if isinstance(cause, ApiException) and cause.status == 404:
            raise _unavailable(
                f"no TrainingRuntime {runtime!r} in namespace {backend.namespace!r} and no ClusterTrainingRuntime "
                f"{runtime!r}: install Kubeflow Trainer's runtimes (kubectl get clustertrainingruntimes)"
            ) from None
        raise _unavailable(f"cannot read the training runtime {runtime!r}: {_cause(exc)}") from None
    command = " ".join(found_runtime.trainer.command or ())
    if "torchrun" not in command:
        raise _unavailable(
            f"the runtime {runtime!r} is a {found_runtime.trainer.framework!r} runtime that does not start torchrun "
            f"(command {command[:60]!r}…); distillation across nodes needs a torch runtime such as {RUNTIME!r}"
        )


def run_distill_trainjob(
    cfg,
    *,
    image: str,
    log: Callable[[str], Any] = print,
    client=None,
    nodes: int | None = None,
    processes_per_node: int | None = None,
    resources_per_node: dict | None = None,
    runtime: str = RUNTIME,
) -> dict:
    """Submit the TrainJob (or attach to the one of an earlier attempt), stream its log into
    ``log``, wait for it, raise ``E3PruneError`` with the job's error on failure, and return the
    summary the distill step wrote (``distillation.json`` under ``cfg.output``).

    ``nodes`` and ``processes_per_node`` default to ``cfg.nodes`` and ``cfg.processes`` (the
    pipeline parameters ``distill_nodes`` and ``distill_processes``) when the config has them, else
    1 and 0. Processes 0 means one per GPU (the runtime's ``auto``). ``resources_per_node`` is the
    SDK's dict (``{"gpu": 8, "cpu": 32, "memory": "900Gi"}``); without it, ``processes_per_node``
    GPUs are asked for, or the runtime's own resources are used.
    """
    nodes = _count(nodes, cfg, "nodes", low=1, field="distill_nodes")
    processes = _count(processes_per_node, cfg, "processes", low=0, field="distill_processes")
    client = client if client is not None else _trainer_client()
    local = _is_local(client)
    _check_locations(cfg, nodes, local)
    params = _func_args(cfg)
    resources = _resources(resources_per_node, processes)
    check_trainer_available(client, runtime=runtime)

    name = job_name(cfg.output)
    digest = config_digest(params)
    job = _existing_job(client, name)
    if job is not None:
        job = _reuse_or_clear(client, job, digest, cfg, log)
    if job is None:
        trainer, options = _trainer(client, params, image, nodes, resources, name, digest, cfg, log)
        try:
            client.train(runtime=runtime, trainer=trainer, options=options)
        except (RuntimeError, TimeoutError) as exc:  # e.g. 403 (RBAC) or 422 (the Trainer's webhook refused it)
            raise _unavailable(f"the TrainJob {name} could not be created: {_cause(exc)}") from None
        log(
            f"submitted TrainJob {name}: {nodes} node(s) × "
            f"{processes or 'one process per GPU'}, image {image}, runtime {runtime}"
        )
    elif job.status != COMPLETE:
        log(f"attaching to the running TrainJob {name} of an earlier attempt (status {job.status})")
    tail: list[str] = []
    if job is None or job.status != COMPLETE:
        job, tail = _follow(client, name, log)
    if job.status == FAILED:
        raise _job_error(client, name, tail)
    try:
        return json.loads(storage.read_file(cfg.output, _summary_file(), field="output"))
    except E3PruneError as exc:
        why = str(exc).removeprefix("output: ")
        raise E3PruneError(f"TrainJob {name} completed but its output is not readable: {why}", field="output") from None


def job_name(output: str) -> str:
    """The TrainJob's name for an output: deterministic, an RFC 1035 label (the Trainer names the
    JobSet, its Service and pods after it) of 27 characters, well under the 63 allowed."""
    return NAME_PREFIX + hashlib.sha256(str(output).rstrip("/").encode()).hexdigest()[:16]


def config_digest(params: Mapping[str, Any]) -> str:
    """What a running job was started with: attaching to a job of other settings would be wrong."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]


def forwarded_env(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(plain variables by value, names of secret variables) of the step's environment that the
    training pods need: ``AWS_*``, ``MLFLOW_*``, ``HF_*``, without the step's pod identity."""
    plain, secret = {}, []
    for key, value in sorted(environ.items()):
        if not key.startswith(FORWARDED_PREFIXES) or key in _POD_IDENTITY:
            continue
        if _SECRET_NAME.search(key):
            secret.append(key)
        else:
            plain[key] = value
    return plain, secret


# --------------------------------------------------------------------------- helpers


def _trainer_client():
    """The SDK's client on its Kubernetes backend: kube config, else in-cluster credentials."""
    from kubeflow.trainer import TrainerClient
    from kubernetes.config.config_exception import ConfigException

    try:
        return TrainerClient()
    except (ConfigException, FileNotFoundError, OSError) as exc:
        raise _unavailable(
            "no Kubernetes credentials to submit a Kubeflow TrainJob: no kube config (KUBECONFIG or ~/.kube/config) "
            "and no in-cluster service-account token (/var/run/secrets/kubernetes.io/serviceaccount); in a pipeline, "
            f"let the step's service account token be mounted ({exc})"
        ) from None


def _unavailable(why: str) -> E3PruneError:
    return E3PruneError(
        f"distillation across nodes needs Kubeflow Trainer v2, and {why}; or set distill_nodes to 1",
        field="distill_nodes",
    )


def _status(exc) -> str:
    reason = exc.reason or ""
    try:
        reason = json.loads(exc.body).get("message") or reason
    except (TypeError, ValueError, AttributeError):
        pass
    hint = " (the step's service account needs the Role in docs/operations.md)" if exc.status in (401, 403) else ""
    return f"HTTP {exc.status} {reason}{hint}"


def _cause(exc: BaseException) -> str:
    """What the API server said, behind the SDK's own RuntimeError."""
    from kubernetes.client.exceptions import ApiException

    cause = exc.__cause__
    return _status(cause) if isinstance(cause, ApiException) else f"{exc}" + (f": {cause}" if cause else "")


def _is_local(client) -> bool:
    from kubeflow.trainer.backends.localprocess.backend import LocalProcessBackend

    return isinstance(getattr(client, "backend", None), LocalProcessBackend)


def _count(value: int | None, cfg, attr: str, *, low: int, field: str) -> int:
    value = value if value is not None else getattr(cfg, attr)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise E3PruneError(f"must be an integer ≥ {low}, got {value!r}", field=field)
    return value


def _check_locations(cfg, nodes: int, local: bool) -> None:
    """On Kubernetes the training pods see none of the step's files: every location is S3."""
    if local:
        if nodes > 1:
            raise E3PruneError(
                "the local-process backend runs one node; distillation across nodes runs on Kubernetes",
                field="distill_nodes",
            )
        return
    locations = {
        "output": cfg.output,
        "checkpoint_dir": cfg.checkpoint_location(),
        "student": cfg.student,
        "teacher_cache": cfg.teacher_cache,
    }
    for field, uri in locations.items():
        if not storage.is_s3(uri):
            raise E3PruneError(
                f"distillation on a Kubeflow TrainJob ({nodes} node(s)) needs shared storage every node reaches: "
                f"an s3:// URI, got the local path {uri!r} (set storage_prefix)",
                field=field,
            )


def _func_args(cfg) -> dict[str, Any]:
    """The settings the pods parse again. The SDK writes them into an unquoted shell here-document
    as a Python literal, so ``$``, backquotes and backslashes would be changed by the shell."""
    params = cfg.model_dump(mode="json")
    for key, value in params.items():
        if any(c in text for text in _strings(value) for c in "$`\\"):
            raise E3PruneError(
                "cannot be passed to a Kubeflow TrainJob: it holds $, ` or \\ (the SDK embeds the settings in a "
                f"shell script); got {value!r}",
                field=key,
            )
    return params


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _resources(resources_per_node: dict | None, processes: int) -> dict | None:
    """Per-node resources. The SDK (0.5.0) cannot set the TrainJob's numProcPerNode, so the runtime
    starts one process per GPU (``auto``): processes per node must equal the GPUs asked for."""
    if resources_per_node is None:
        return {"gpu": processes} if processes else None
    resources = dict(resources_per_node)
    gpus = next((v for k, v in resources.items() if k.lower() in ("gpu", "nvidia.com/gpu")), None)
    if processes and str(gpus) != str(processes):
        raise E3PruneError(
            f"a Kubeflow TrainJob starts one process per GPU of a node; got {processes} process(es) per node "
            f"and {gpus or 'no'} GPU(s) per node; set distill_processes to 0 (one per GPU) or to the GPU count",
            field="distill_processes",
        )
    return resources


def _existing_job(client, name: str):
    """The TrainJob of that name, or None (the Kubernetes backend wraps a 404, the local one raises ValueError)."""
    from kubernetes.client.exceptions import ApiException

    try:
        return client.get_job(name)
    except ValueError:
        return None
    except (RuntimeError, TimeoutError) as exc:
        if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
            return None
        raise _unavailable(f"cannot read the TrainJob {name}: {_cause(exc)}") from None


def _reuse_or_clear(client, job, digest: str, cfg, log):
    """Attach to a live job of the same settings, reuse a complete one, delete a failed one."""
    name = job.name
    if job.status in (CREATED, RUNNING):
        theirs = _annotation(client, name, CONFIG_ANNOTATION)
        if theirs is not None and theirs != digest:
            raise E3PruneError(
                f"TrainJob {name} is already distilling into {cfg.output} with other settings; "
                f"wait for it or delete it (kubectl delete trainjob {name}), or choose another output",
                field="output",
            )
        return job
    if job.status == COMPLETE and storage.is_complete(cfg.output):
        log(f"TrainJob {name} of an earlier attempt is complete; using its output {cfg.output}")
        return job
    log(f"TrainJob {name} of an earlier attempt ended {job.status}; deleting it and submitting again (resumes from "
        f"the checkpoints at {cfg.checkpoint_location()})")  # fmt: skip
    try:
        client.delete_job(name)
    except (RuntimeError, TimeoutError) as exc:
        raise _unavailable(f"cannot delete the ended TrainJob {name}: {_cause(exc)}") from None
    deadline = time.monotonic() + DELETE_TIMEOUT_SECONDS
    while _existing_job(client, name) is not None:  # a deleted job lingers while its pods stop
        if time.monotonic() > deadline:
            raise E3PruneError(f"TrainJob {name} was deleted but still exists after {DELETE_TIMEOUT_SECONDS} s",
                               field="distill_nodes")  # fmt: skip
        time.sleep(POLL_SECONDS)
    return None


def _annotation(client, name: str, key: str) -> str | None:
    backend = client.backend
    if _is_local(client):
        return None
    from kubeflow.trainer.constants import constants

    obj = backend.custom_api.get_namespaced_custom_object(
        constants.GROUP, constants.VERSION, backend.namespace, constants.TRAINJOB_PLURAL, name
    )
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(key)


def _trainer(client, params, image, nodes, resources, name, digest, cfg, log):
    from kubeflow.trainer import CustomTrainer
    from kubeflow.trainer.options import Annotations, Labels, Name

    if _is_local(client):
        # A local process inherits this process's environment, as any subprocess would (the SDK
        # gives it only `env`, not even PATH).
        env, secret = dict(os.environ), []
    else:
        env, secret = forwarded_env(os.environ)
        if _gpus(resources):
            env.update(FSDP_ENV)
    trainer = CustomTrainer(
        func=distill_on_trainjob,
        func_args=params,
        image=image,
        num_nodes=nodes,
        resources_per_node=resources,
        env=env or None,
    )
    options = [Name(name)]
    if not _is_local(client):
        options += [
            Labels({"app.kubernetes.io/part-of": "e3-pruner", "app.kubernetes.io/component": "distill"}),
            Annotations({OUTPUT_ANNOTATION: str(cfg.output), CONFIG_ANNOTATION: digest}),
        ]
        patch = _runtime_patch(secret, gpus=_gpus(resources))
        if patch is not None:
            options.append(patch)
        log(
            f"training pods get {', '.join(sorted(set(env) - set(FSDP_ENV))) or 'no variables'} by value"
            + (f" and {', '.join(secret)} from Secret {CREDENTIALS_SECRET}" if secret else "")
            + (", and train with FSDP over every GPU of the job" if _gpus(resources) else "")
        )
    return trainer, options


def _gpus(resources: dict | None) -> bool:
    return bool(resources) and any(
        k.lower() in ("gpu", "nvidia.com/gpu") and str(v) != "0" for k, v in resources.items()
    )


def _runtime_patch(secret_names: list[str], *, gpus: bool):
    """The node container's secrets by reference, and a memory-backed /dev/shm for NCCL on GPUs."""
    if not secret_names and not gpus:
        return None
    from kubeflow.trainer.options import (
        ContainerPatch,
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainingRuntimeSpecPatch,
    )

    env = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": CREDENTIALS_SECRET, "key": key, "optional": True}}}
        for key in secret_names
    ]
    volumes, mounts = None, None
    if gpus:
        volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
        mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    container = ContainerPatch(name="node", env=env or None, volume_mounts=mounts)
    pod = PodSpecPatch(containers=[container], volumes=volumes)
    job = JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(spec=pod)))
    return RuntimePatch(
        training_runtime_spec=TrainingRuntimeSpecPatch(
            template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[ReplicatedJobPatch("node", job)]))
        )
    )


def _follow(client, name: str, log) -> tuple[Any, list[str]]:
    """Stream node 0's log while its pod runs (again if the pod is replaced), until the job ends;
    the job and the last lines of its log."""
    streamed_pod = None
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    terminal = {COMPLETE, FAILED}
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while True:
        try:
            job = client.wait_for_job_status(
                name, status={RUNNING, *terminal}, timeout=START_TIMEOUT_SECONDS, polling_interval=POLL_SECONDS
            )
        except TimeoutError:
            raise E3PruneError(
                f"TrainJob {name} did not start within {START_TIMEOUT_SECONDS} s (kubectl describe trainjob {name})",
                field="distill_nodes",
            ) from None
        # node 0's pod on Kubernetes; the local-process backend's one step is "train"
        pod = next((s.pod_name for s in job.steps if s.name in (NODE_STEP, "train")), None)
        if job.status in terminal and (pod is None or pod == streamed_pod):
            return job, list(tail)
        if pod is not None and pod != streamed_pod:
            streamed_pod = pod
            try:
                for chunk in client.get_job_logs(name, follow=True):
                    for line in str(chunk).splitlines():
                        tail.append(line)
                        log(line)
            except RuntimeError as exc:  # the pod went away mid-stream; its status says the rest
                log(f"the log of {pod} ended early ({exc}); waiting for TrainJob {name}")
            continue
        if job.status in terminal:
            return job, list(tail)
        if time.monotonic() > deadline:
            raise E3PruneError(
                f"TrainJob {name} still runs after {RUN_TIMEOUT_SECONDS} s; the step stops following it "
                f"(it keeps running: kubectl logs -f {pod}; kubectl delete trainjob {name} to stop it)",
                field="distill_nodes",
            )
        time.sleep(POLL_SECONDS)


def _job_error(client, name: str, tail: list[str]) -> E3PruneError:
    """The job's error: distill's own (its marker line), else the Trainer's condition message,
    the failed containers' reasons and the last lines of node 0's log."""
    if not tail:
        try:
            tail = [line for chunk in client.get_job_logs(name) for line in str(chunk).splitlines()][-LOG_TAIL_LINES:]
        except Exception:  # noqa: BLE001 - the logs may be gone with the pods; the rest still says why
            tail = []
    for line in reversed(tail):
        if ERROR_MARKER in line:
            err = json.loads(line.split(ERROR_MARKER, 1)[1])
            return E3PruneError(f"TrainJob {name} failed: {err['message']}", field=err.get("field"))
    parts = [f"TrainJob {name} failed"]
    local = _is_local(client)
    if not local:
        parts += _condition_and_pods(client, name)
    if tail:
        parts.append("last lines of node 0: " + " | ".join(tail[-5:]))
    return E3PruneError("; ".join(parts) + ("" if local else f" (kubectl describe trainjob {name})"))


def _condition_and_pods(client, name: str) -> list[str]:
    from kubeflow.trainer.constants import constants

    backend, parts = client.backend, []
    try:
        obj = backend.custom_api.get_namespaced_custom_object(
            constants.GROUP, constants.VERSION, backend.namespace, constants.TRAINJOB_PLURAL, name
        )
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("type") == FAILED and c.get("status") == "True":
                parts.append(f"{c.get('reason') or FAILED}: {c.get('message') or 'no message'}")
        pods = backend.core_api.list_namespaced_pod(
            backend.namespace, label_selector=f"{constants.JOBSET_NAME_LABEL}={name}"
        )
        for pod in pods.items:
            for status in (pod.status and pod.status.container_statuses) or []:
                ended = status.state and status.state.terminated
                if ended is not None and ended.exit_code:
                    why = f"{ended.reason or 'Error'} (exit {ended.exit_code})"
                    if ended.message:
                        why += f": {ended.message.strip()[:300]}"
                    parts.append(f"pod {pod.metadata.name}: {why}")
    except Exception as exc:  # noqa: BLE001 - the failure is reported either way
        parts.append(f"(its status could not be read: {type(exc).__name__}: {exc})")
    return parts


def _summary_file() -> str:
    from e3prune.distill import SUMMARY_FILE

    return SUMMARY_FILE
