"""Where the steps run: image, requests and limits, GPUs, node selection — fixed at compile time.

Two builds are committed beside the pipeline: ``pipeline.yaml`` (CPU image, no GPU; the shipped
model, small runs) and ``pipeline-gpu.yaml`` (:data:`GPU`: the CUDA image, ``nvidia.com/gpu``
limits on the heavy steps, a node selector and a toleration for GPU nodes, and a memory-backed
``/dev/shm`` for NCCL). ``e3prune compile --gpu …`` writes a variant with other GPU counts, node
labels or tolerations without editing Python (docs/operations.md). ``kfp.local`` ignores all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kfp import dsl, kubernetes

S3_SECRET = "e3-pruner-s3"  # AWS keys, HF_TOKEN, MLflow credentials (optional keys)
ENV_CONFIG_MAP = "e3-pruner-env"  # keys AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, MLFLOW_TRACKING_URI
SECRET_KEYS = {
    k: k
    for k in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    )
}
CONFIG_KEYS = {k: k for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "HF_ENDPOINT")}

# Requests and limits per step on CPU nodes (docs/operations.md lists what each step needs for 8B and 32B).
CPU_RESOURCES: dict[str, dict[str, str]] = {
    "detect-release": {"cpu_request": "500m", "memory_request": "2Gi", "memory_limit": "4Gi"},
    "sample-data": {"cpu_request": "2", "memory_request": "4Gi", "memory_limit": "16Gi"},
    "teacher-logits": {"cpu_request": "4", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "join-teacher-cache": {"cpu_request": "500m", "memory_request": "1Gi", "memory_limit": "4Gi"},
    "search-mask": {"cpu_request": "4", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "harden-mask": {"cpu_request": "2", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "distill": {"cpu_request": "4", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "evaluate": {"cpu_request": "4", "memory_request": "8Gi", "memory_limit": "32Gi"},
    "export": {"cpu_request": "1", "memory_request": "2Gi", "memory_limit": "8Gi"},
    "register": {"cpu_request": "500m", "memory_request": "1Gi", "memory_limit": "4Gi"},
    "promote": {"cpu_request": "250m", "memory_request": "512Mi", "memory_limit": "2Gi"},
}
STEPS = tuple(CPU_RESOURCES)  # the task names, in the order they run
# The steps that hold a model: on a GPU build they get GPUs, host memory to load shards and /dev/shm.
GPU_STEPS = ("teacher-logits", "search-mask", "harden-mask", "distill", "evaluate")
GPU_HOST = {"cpu_request": "8", "memory_request": "64Gi", "memory_limit": "256Gi"}
# Steps that talk to the network (hub, S3, MLflow): retried with backoff; the others fail fast.
# detect-release is not: it mostly fails on a bad parameter, where a retry only delays the
# message, and it is cheap to run again (a schedule does, the next time).
NETWORK_RETRIES = {"sample-data": 2, "export": 3, "register": 3, "promote": 3}


@dataclass(frozen=True)
class Toleration:
    key: str
    effect: str = "NoSchedule"
    value: str | None = None  # None: operator Exists

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """``key[=value][:Effect]``, as ``kubectl taint`` writes a taint."""
        spec, _, effect = text.partition(":")
        key, _, value = spec.partition("=")
        if not key or effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"toleration {text!r}: give key[=value][:NoSchedule|PreferNoSchedule|NoExecute]")
        return cls(key=key, effect=effect or "NoSchedule", value=value or None)


@dataclass(frozen=True)
class Cluster:
    """What the compiled pipeline asks of the cluster."""

    image: str | None = None  # None: the components' base image (components/image.py)
    gpus: dict[str, int] = field(default_factory=dict)  # task name -> nvidia.com/gpu limit
    accelerator: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    shm_size: str | None = None  # a memory-backed /dev/shm of this size on the GPU steps

    def resources(self, name: str) -> dict[str, str]:
        return {**CPU_RESOURCES[name], **(GPU_HOST if name in self.gpus else {})}


CPU = Cluster()


def gpu_cluster(
    gpus: int = 1,
    distill_gpus: int = 1,
    node_selector: dict[str, str] | None = None,
    tolerations: tuple[Toleration, ...] = (Toleration("nvidia.com/gpu"),),
    shm_size: str = "16Gi",
    image: str | None = None,
) -> Cluster:
    """The GPU build: ``gpus`` per heavy step (``distill_gpus`` for distill), the CUDA image."""
    from e3prune_components.image import CUDA_IMAGE

    counts = {name: gpus for name in GPU_STEPS} | {"distill": distill_gpus}
    selector = {"nvidia.com/gpu.present": "true"} if node_selector is None else node_selector
    return Cluster(CUDA_IMAGE if image is None else image, counts, "nvidia.com/gpu", selector, tolerations, shm_size)


GPU = gpu_cluster()


def configure(task: dsl.PipelineTask, name: str, cluster: Cluster, cache: bool = True) -> dsl.PipelineTask:
    """Display name, resources, retries, caching, credentials and placement of one task."""
    task.set_display_name(name)
    spec = cluster.resources(name)
    task.set_cpu_request(spec["cpu_request"]).set_memory_request(spec["memory_request"])
    task.set_memory_limit(spec["memory_limit"])
    if name in NETWORK_RETRIES:
        task.set_retry(num_retries=NETWORK_RETRIES[name], backoff_duration="30s", backoff_factor=2.0)
    if not cache:
        task.set_caching_options(enable_caching=False)
    kubernetes.use_secret_as_env(task, S3_SECRET, SECRET_KEYS, optional=True)
    kubernetes.use_config_map_as_env(task, ENV_CONFIG_MAP, CONFIG_KEYS, optional=True)
    if cluster.image:
        task.set_container_image(cluster.image)
    if name == "distill":  # the step's own image, for the pods of a TrainJob (distill_nodes > 1)
        from e3prune_components.image import IMAGE

        task.set_env_variable("E3PRUNE_IMAGE", cluster.image or IMAGE)
    if name in cluster.gpus:
        _place_on_gpus(task, cluster, cluster.gpus[name])
    return task


def _place_on_gpus(task: dsl.PipelineTask, cluster: Cluster, count: int) -> None:
    task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(count)
    for key, value in sorted(cluster.node_selector.items()):
        kubernetes.add_node_selector(task, key, value)
    for t in cluster.tolerations:
        operator = "Equal" if t.value is not None else "Exists"
        kubernetes.add_toleration(task, key=t.key, operator=operator, value=t.value, effect=t.effect)
    if cluster.shm_size:
        kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=cluster.shm_size)


def with_gpus(cluster: Cluster, **counts: int) -> Cluster:
    """The same cluster with other GPU counts per task (``distill=8``)."""
    return replace(cluster, gpus={**cluster.gpus, **{k.replace("_", "-"): v for k, v in counts.items()}})
