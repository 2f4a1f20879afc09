"""``e3prune plan``: memory, GPUs and time of every heavy step, from a model's ``config.json`` alone.

Nothing but the config is read: the architecture is instantiated on the meta device
(``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``, as
:func:`e3prune.placement.model_size` does), so every family of :mod:`e3prune.adapters` is sized
from its own modules. The student has the ``n = round(remove_ratio · L)`` smallest decoder layers
removed (for uniform layers: any n); the search decides which, later.

The arithmetic (docs/operations.md, "Resources per step, and GPU nodes" and "Running 8B / 32B /
70B"). P: teacher parameters, P': student parameters, T: tokens of one micro-batch (batch ·
seq_len), h hidden size, I intermediate size, q = heads · head_dim, kv = kv-heads · head_dim,
V vocabulary, b: bytes of an activation (2 in bf16 on GPUs, 4 in fp32 on the CPU).

- teacher-logits: frozen weights (P·b) + one forward's transient, the larger of a layer's
  (T·(3I + 3h)·b: gate, up and their product beside the residual) and the logits'
  (T·V·(b + 4 + 4): the logits, their fp32 copy on GPUs, logsumexp's temporary).
  On the CPU every step also pays :data:`CPU_RUNTIME_BYTES` (48 MiB: the loading machinery,
  thread pools and allocator arenas of a process that runs a model, beyond its imports; the
  one constant taken from a measurement, the 5 M model's teacher step in
  benchmarks/results/scale.md).
- search: frozen weights + what autograd keeps for the activation-only backward through the k
  kept layers, T·(2h + 3I + 3q + 3kv)·b per layer (counted with saved-tensor hooks on a Qwen3
  layer: SiLU's input, the product's two factors, q/k/v and attention's output; the gate's
  h − F(h)), plus the fp32 logits, their gradient and the loss's temporaries (5 · T·V·4, and
  T·V·2 more on GPUs for the bf16 gradient).
- harden: the CPU; the source in its checkpoint dtype plus the student's serialised copy.
- distill: 16 bytes a student parameter (fp32 weights, fp32 gradients, AdamW's two fp32
  moments), sharded by FSDP over every GPU of every node, plus per GPU the unsharded bf16 layers
  (the one computed and the one prefetched), the bf16 embeddings and head, one layer's fp32
  gradient for the reduce-scatter, the saved activations of a trainable layer,
  T·(5h + 4I + 4q + 4kv)·b for each of the student's layers (no activation checkpointing,
  ``configs/accelerate/fsdp_gpu.yaml``), and the logits as in the search; at the optimizer
  step, when the activations are gone, foreach AdamW's temporaries (4 bytes a parameter,
  sharded) instead, whichever is larger. On the CPU: the same, unsharded, in fp32.
- evaluate: teacher, pruned and student side by side ((P + 2P')·b) plus 6 · T·V·4 of logits.

A single-process step (teacher-logits, search, evaluate) is placed on one GPU when it fits,
else sharded by whole layers over the GPUs of one node (``e3prune.placement``): more GPUs give it
memory, not speed. GPU memory counts as :data:`USABLE_FRACTION` of the card (CUDA context, NCCL
buffers, the allocator's fragmentation take the rest).

Time = FLOPs / (GPUs computing at once · dense bf16 peak · MFU), FLOPs = 2·N per token of a
forward and 6·N of a training step (attention's S² term left out); the search is a forward of P
and an activation-only backward of P' (2·P + 2·P' per token) plus its KL initialisation
(L + 1 forwards of ``init_sequences``) and final scoring (≤ 17 forwards of the student over
``final_sequences``). Harden is I/O: (P + P')·2 bytes at :data:`HARDEN_IO_BYTES_PER_S`.

``device="cpu"`` plans one CPU process in fp32 (b = 4, weights 4 bytes a parameter, no
sharding): the mode ``benchmarks/memory_model.py`` compares against measured peaks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field, field_validator

from e3prune.adapters import get_adapter
from e3prune.config import StepConfig, open_unit_interval
from e3prune.errors import E3PruneError
from e3prune.run_config import RunConfig
from e3prune.search import SearchConfig


@dataclass(frozen=True)
class GpuType:
    """One accelerator: memory (GiB, as the driver reports it), dense bf16 peak and how GPUs of a node talk."""

    name: str
    memory_gib: float
    bf16_tflops: float
    interconnect: Literal["NVLink", "PCIe"]


GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in (
        GpuType("H100-80GB", 79.6, 989.0, "NVLink"),
        GpuType("H200-141GB", 140.4, 989.0, "NVLink"),
        GpuType("A100-80GB", 80.0, 312.0, "NVLink"),
        GpuType("A100-40GB", 40.0, 312.0, "NVLink"),
        GpuType("L40S-48GB", 45.0, 362.0, "PCIe"),
    )
}
USABLE_FRACTION = 0.90  # of a GPU's memory; the rest: CUDA context, NCCL, fragmentation
MAX_GPUS_PER_NODE = 8
PLACEMENT_MARGIN = 1.25  # e3prune.placement: weights + 25 % must fit a GPU's budget
CPU_RUNTIME_BYTES = 48 * 2**20  # a CPU step's fixed cost beyond its imports (load machinery, thread pools, arenas)
HARDEN_IO_BYTES_PER_S = 1e9  # read the source, write the student (disk or S3)
CACHE_ID_BYTES = 4  # int32 token id stored beside every cached token
FINAL_CANDIDATES = 17  # at most: top-k θ, 3 frequent masks, 3 × 3 swaps, 4 earlier θ
STEPS = ("teacher-logits", "search", "harden", "distill", "evaluate")
GIB = 2**30


def _default(name: str) -> Any:
    """A pipeline parameter's default, from :class:`RunConfig` (so the plan's defaults never drift)."""
    return RunConfig.model_fields[name].default


def _gpu_type(value: str) -> str:
    if value not in GPU_TYPES:
        raise ValueError(f"unknown GPU type {value!r}; allowed: {', '.join(GPU_TYPES)}")
    return value


class PlanConfig(StepConfig):
    """What ``e3prune plan`` takes; the budgets default to the pipeline's (``RunConfig``)."""

    model: str = Field(description="a model directory with config.json, or a config.json file (no weights are read)")
    gpu_type: Annotated[str, AfterValidator(_gpu_type)] = Field(
        "H100-80GB", description="GPU of the nodes: " + ", ".join(GPU_TYPES)
    )
    gpus: int = Field(8, ge=1, le=MAX_GPUS_PER_NODE, description="GPUs per node")
    nodes: int = Field(1, ge=1, le=1024, description="nodes (distill shards over every GPU of every node)")
    device: Literal["gpu", "cpu"] = Field(
        "gpu", description="gpu: bf16 on the GPUs above; cpu: one CPU process in fp32 (what the benchmark measures)"
    )
    mfu: float = Field(0.40, gt=0, le=1, description="assumed model FLOPs utilisation of the GPUs' dense bf16 peak")
    remove_ratio: Annotated[float, AfterValidator(open_unit_interval)] = Field(
        _default("remove_ratio"), description="fraction of decoder layers removed"
    )
    seq_len: int = Field(_default("seq_len"), ge=2, description="tokens per sequence")
    search_split_tokens: int = Field(_default("search_split_tokens"), ge=0, description="teacher tokens of the search split")
    distill_split_tokens: int = Field(
        _default("distill_split_tokens"), ge=0, description="teacher tokens of the distill split"
    )
    eval_split_tokens: int = Field(_default("eval_split_tokens"), ge=0, description="held-out tokens evaluated")
    search_tokens: int = Field(_default("search_budget_tokens"), ge=1, description="search budget (tokens)")
    distill_tokens: int = Field(_default("distill_budget_tokens"), ge=1, description="distillation budget (tokens)")
    top_k: int = Field(_default("top_k"), ge=1, description="teacher logits cached per token")
    teacher_batch_size: int = Field(_default("teacher_batch_size"), ge=1, description="sequences per teacher forward")
    teacher_shards: int = Field(
        _default("teacher_shards"), ge=1, le=256,
        description="parallel teacher-logits tasks (pods), each with the GPUs the step needs; divides its time",
    )  # fmt: skip
    search_batch_size: int = Field(_default("search_batch_size"), ge=1, description="sequences per search step")
    distill_batch_size: int = Field(
        _default("distill_batch_size"), ge=1, description="sequences per GPU per distillation micro-batch"
    )
    eval_batch_size: int = Field(_default("eval_batch_size"), ge=1, description="sequences per evaluation forward")
    init_sequences: int = Field(
        SearchConfig.model_fields["init_sequences"].default,
        ge=0,
        description="search-split sequences of the search's KL initialisation",
    )
    final_sequences: int = Field(
        SearchConfig.model_fields["final_sequences"].default,
        ge=0,
        description="held-back search-split sequences that score the final candidates",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value.startswith("s3://"):
            raise ValueError("give a local directory or config.json (plan reads no weights and no S3)")
        return value


@dataclass(frozen=True)
class ModelShape:
    """The sizes the arithmetic needs, from a config instantiated on the meta device."""

    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    vocab: int
    params: int
    per_layer: tuple[int, ...]
    tied: bool

    def student_params(self, n_remove: int) -> int:
        return self.params - sum(sorted(self.per_layer)[:n_remove])

    @property
    def largest_layer(self) -> int:
        return max(self.per_layer)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


def load_plan_config(path: str | os.PathLike) -> Any:
    """The transformers config of a directory holding config.json, or of a config.json file."""
    from transformers import AutoConfig

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise E3PruneError(f"{path} is neither a config.json nor a directory that holds one", field="model")
    try:
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise E3PruneError(f"{p} cannot be read as a transformers config: {exc}", field="model") from None
    get_adapter(config)
    return config


def model_shape(path: str | os.PathLike) -> ModelShape:
    """Parameters (total and per decoder layer) and the activation sizes, with no weights read."""
    from transformers import AutoModelForCausalLM

    config = load_plan_config(path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layers = get_adapter(config).decoder_layers(meta)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        vocab=config.vocab_size,
        params=sum(p.numel() for p in meta.parameters()),
        per_layer=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


# --------------------------------------------------------------------------- memory formulas (bytes)


def forward_transient(s: ModelShape, tokens: int, act: int, gpu: bool) -> int:
    """A no-grad forward's peak beside the weights: a layer's MLP or the logits, whichever is larger."""
    layer = tokens * (3 * s.intermediate + 3 * s.hidden) * act
    logits = tokens * s.vocab * (act + (4 if gpu else 0) + 4)
    return max(layer, logits)


def frozen_layer_activations(s: ModelShape, tokens: int, act: int) -> int:
    """What autograd keeps per gated, frozen layer for the activation-only backward of the search."""
    return tokens * (2 * s.hidden + 3 * s.intermediate + 3 * s.q_dim + 3 * s.kv_dim) * act


def trainable_layer_activations(s: ModelShape, tokens: int, act: int) -> int:
    """What autograd keeps per trainable layer (weight gradients need every linear's input)."""
    return tokens * (5 * s.hidden + 4 * s.intermediate + 4 * s.q_dim + 4 * s.kv_dim) * act


def loss_logits(s: ModelShape, tokens: int, gpu: bool) -> int:
    """The fp32 logits, their gradient and the top-K loss's temporaries, five fp32 T × V tensors at the
    backward's peak (plus the bf16 gradient of the head's output on GPUs)."""
    return tokens * s.vocab * (20 + (2 if gpu else 0))


@dataclass
class StepPlan:
    step: str
    where: str  # "gpu" or "cpu"
    memory_bytes: int  # per GPU (or the CPU process's peak)
    parts: dict[str, int]  # what memory_bytes is made of
    gpus: int  # GPUs per node it needs (0 on the CPU)
    nodes: int
    flops: float
    seconds: float | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "where": self.where,
            "memory_gib": round(self.memory_bytes / GIB, 2),
            "memory_bytes": self.memory_bytes,
            "parts_gib": {k: round(v / GIB, 3) for k, v in self.parts.items()},
            "gpus_per_node": self.gpus,
            "nodes": self.nodes,
            "flops": self.flops,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "note": self.note,
        }


def _single_pod(
    name: str, weights: int, sharded_rest: int, per_gpu_rest: int, cfg: PlanConfig, gpu: GpuType, flops: float
) -> tuple[StepPlan, int]:
    """A one-process step: the fewest GPUs of one node whose share of the weights fits the placement's
    budget (usable / 1.25) and whose total fits; returns the plan and the GPUs it would need (may exceed 8)."""
    usable = gpu.memory_gib * GIB * USABLE_FRACTION
    n = 1
    while n < 64 and not (
        weights / n <= usable / PLACEMENT_MARGIN and (weights + sharded_rest) / n + per_gpu_rest <= usable
    ):
        n += 1
    memory = math.ceil((weights + sharded_rest) / n + per_gpu_rest)
    seconds = flops / (gpu.bf16_tflops * 1e12 * cfg.mfu)
    note = "one GPU" if n == 1 else f"sharded by layers over {n} GPUs of one node (memory, not speed)"
    parts = {"weights": math.ceil(weights / n), "activations": math.ceil(sharded_rest / n + per_gpu_rest)}
    return StepPlan(name, "gpu", memory, parts, n, 1, flops, seconds, note), n


def plan(cfg: PlanConfig, shape: ModelShape | None = None) -> dict[str, Any]:
    """The plan of every heavy step; refuses (one :class:`E3PruneError`) a plan that cannot fit."""
    from e3prune.selection import n_remove_for

    s = shape or model_shape(cfg.model)
    n_remove = n_remove_for(cfg.remove_ratio, s.num_layers)
    k = s.num_layers - n_remove
    P, Ps = s.params, s.student_params(n_remove)
    gpu_mode = cfg.device == "gpu"
    act = 2 if gpu_mode else 4
    wb = 2 if gpu_mode else 4  # frozen weights: bf16 on GPUs, fp32 on the CPU
    t_teacher = cfg.teacher_batch_size * cfg.seq_len
    t_search = cfg.search_batch_size * cfg.seq_len
    t_distill = cfg.distill_batch_size * cfg.seq_len
    t_eval = cfg.eval_batch_size * cfg.seq_len
    teacher_tokens = cfg.search_split_tokens + cfg.distill_split_tokens
    cache_bytes_per_token = cfg.top_k * (2 + 4) + 4 + CACHE_ID_BYTES

    flops = {
        "teacher-logits": 2.0 * P * teacher_tokens,
        "search": (2.0 * P + 2.0 * Ps) * cfg.search_tokens
        + 2.0 * P * (s.num_layers + 1) * cfg.init_sequences * cfg.seq_len
        + 2.0 * Ps * FINAL_CANDIDATES * cfg.final_sequences * cfg.seq_len,
        "harden": 0.0,
        "distill": 6.0 * Ps * cfg.distill_tokens,
        "evaluate": 2.0 * (P + 2 * Ps) * cfg.eval_split_tokens,
    }
    mem = {
        "teacher-logits": (P * wb, 0, forward_transient(s, t_teacher, act, gpu_mode)),
        "search": (P * wb, k * frozen_layer_activations(s, t_search, act), loss_logits(s, t_search, gpu_mode)),
        "evaluate": ((P + 2 * Ps) * wb, 0, 6 * t_eval * s.vocab * 4),
    }
    harden_bytes = P * 2 + Ps * 2  # the checkpoint's own dtype (bf16) + the serialised student
    harden_time = (P + Ps) * 2 / HARDEN_IO_BYTES_PER_S
    distill_acts = (s.num_layers - n_remove) * trainable_layer_activations(s, t_distill, act) + loss_logits(
        s, t_distill, gpu_mode
    )

    steps: list[StepPlan] = []
    problems: list[tuple[str, str]] = []  # (field, why)
    if not gpu_mode:
        for name in STEPS:
            if name == "harden":
                parts = {"weights": P * 4, "serialised student": Ps * 4}
            elif name == "distill":
                parts = {"weights+grads+AdamW": 16 * Ps, "activations": distill_acts, "runtime": CPU_RUNTIME_BYTES}
            else:
                w, sharded, rest = mem[name]
                parts = {"weights": w, "activations": sharded + rest, "runtime": CPU_RUNTIME_BYTES}
            steps.append(StepPlan(name, "cpu", sum(parts.values()), parts, 0, 1, flops[name], None, "one CPU process, fp32"))
        return _result(cfg, s, n_remove, Ps, teacher_tokens, cache_bytes_per_token, steps, None)

    gpu = GPU_TYPES[cfg.gpu_type]
    usable = gpu.memory_gib * GIB * USABLE_FRACTION
    for name in STEPS:
        if name == "harden":
            steps.append(
                StepPlan(
                    "harden", "cpu", harden_bytes, {"host RAM": harden_bytes}, 0, 1, 0.0, harden_time,
                    f"CPU host RAM; I/O at {HARDEN_IO_BYTES_PER_S / 1e9:g} GB/s",
                )
            )  # fmt: skip
            continue
        if name == "distill":
            steps.append(_distill(cfg, s, gpu, Ps, distill_acts, flops["distill"], problems))
            continue
        w, sharded, rest = mem[name]
        step, need = _single_pod(name, w, sharded, rest, cfg, gpu, flops[name])
        if name == "teacher-logits" and cfg.teacher_shards > 1:  # N pods, each a slice of the sequences
            step.seconds /= cfg.teacher_shards
            step.note += f"; {cfg.teacher_shards} tasks in parallel, {cfg.teacher_shards * need} GPUs in all"
        if need > MAX_GPUS_PER_NODE:
            problems.append(("gpu_type", f"{name} needs {need} {gpu.name} on one node (a node has at most "
                             f"{MAX_GPUS_PER_NODE}): {_gib(w)} of weights + {_gib(sharded + rest)} working"))  # fmt: skip
        elif need > cfg.gpus:
            problems.append(("gpus", f"{name} needs {need} {gpu.name} on one node, the plan has {cfg.gpus}: "
                             f"{_gib(w)} of weights + {_gib(sharded + rest)} working, {_gib(usable)} usable a GPU"))  # fmt: skip
        steps.append(step)
    if problems:
        fields = [f for f, _ in problems]
        field = next(f for f in ("gpu_type", "gpus", "nodes") if f in fields)
        raise E3PruneError(
            f"the plan does not fit on {cfg.nodes} node(s) × {cfg.gpus} {gpu.name}: " + "; ".join(w for _, w in problems),
            field=field,
        )
    return _result(cfg, s, n_remove, Ps, teacher_tokens, cache_bytes_per_token, steps, gpu)


def _distill(
    cfg: PlanConfig, s: ModelShape, gpu: GpuType, Ps: int, acts: int, flops: float, problems: list
) -> StepPlan:
    """FSDP over every GPU of every node: 16 bytes a parameter sharded, the rest on each GPU."""
    usable = gpu.memory_gib * GIB * USABLE_FRACTION
    total = cfg.gpus * cfg.nodes
    unsharded = 2 * s.largest_layer * 2 + s.embedding_params() * 2 + s.largest_layer * 4
    sharded = 16 * Ps
    # The backward holds the activations; the optimizer step (activations gone) holds foreach AdamW's
    # fp32 temporaries, one more copy of the shard (4 bytes a parameter): whichever is larger.
    fixed = unsharded + acts
    per_gpu = math.ceil(sharded / total + max(unsharded + acts, 4 * Ps / total))
    parts = {"weights+grads+AdamW (sharded)": math.ceil(sharded / total), "unsharded layers": unsharded,
             "activations": acts, "optimizer step temporaries": math.ceil(4 * Ps / total)}  # fmt: skip
    if fixed >= usable:
        problems.append(("gpu_type", f"distill needs {_gib(fixed)} a GPU before any sharded state (unsharded "
                         f"layers + activations of a micro-batch), more than a {gpu.name} holds ({_gib(usable)} "
                         "usable); lower distill_batch_size or give a larger GPU"))  # fmt: skip
        need_total = 10**9
    else:
        need_total = max(math.ceil(sharded / (usable - fixed)), math.ceil(20 * Ps / usable))
    if fixed < usable and need_total > total:
        if math.ceil(need_total / cfg.nodes) <= MAX_GPUS_PER_NODE and cfg.gpus < MAX_GPUS_PER_NODE:
            problems.append(("gpus", f"distill needs {need_total} {gpu.name} in all ({_gib(sharded)} of fp32 weights, "
                             f"gradients and AdamW sharded, {_gib(fixed)} more on each): give --gpus "
                             f"{math.ceil(need_total / cfg.nodes)} on {cfg.nodes} node(s), or a lower distill_batch_size "
                             f"(its activations are {_gib(acts)} a GPU)"))  # fmt: skip
        else:
            problems.append(("nodes", f"distill needs {need_total} {gpu.name} in all ({_gib(sharded)} of fp32 "
                             f"weights, gradients and AdamW sharded, {_gib(fixed)} more on each): give --nodes "
                             f"{math.ceil(need_total / cfg.gpus)} of {cfg.gpus} GPUs, or a lower distill_batch_size "
                             f"(its activations are {_gib(acts)} a GPU)"))  # fmt: skip
    seconds = flops / (total * gpu.bf16_tflops * 1e12 * cfg.mfu)
    note = f"FSDP over {total} GPUs ({cfg.nodes} node(s) × {cfg.gpus}); fits from {min(need_total, 10**6)} GPUs"
    return StepPlan("distill", "gpu", per_gpu, parts, cfg.gpus, cfg.nodes, flops, seconds, note)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _result(cfg, s, n_remove, Ps, teacher_tokens, cache_bpt, steps, gpu) -> dict[str, Any]:
    return {
        "model": str(cfg.model),
        "model_type": s.model_type,
        "parameters": s.params,
        "student_parameters": Ps,
        "layers": s.num_layers,
        "removed_layers": n_remove,
        "device": cfg.device,
        "gpu": None if gpu is None else {"type": gpu.name, "memory_gib": gpu.memory_gib, "bf16_tflops": gpu.bf16_tflops,
                                         "interconnect": gpu.interconnect, "usable_fraction": USABLE_FRACTION},  # fmt: skip
        "gpus_per_node": cfg.gpus if gpu else 0,
        "nodes": cfg.nodes if gpu else 1,
        "mfu": cfg.mfu,
        "tokens": {
            "teacher": teacher_tokens,
            "search": cfg.search_tokens,
            "distill": cfg.distill_tokens,
            "eval": cfg.eval_split_tokens,
            "seq_len": cfg.seq_len,
        },
        "teacher_cache_bytes": teacher_tokens * cache_bpt,
        "teacher_cache_bytes_per_token": cache_bpt,
        "steps": [st.as_dict() for st in steps],
        "total_seconds": None if gpu is None else round(sum(st.seconds or 0 for st in steps), 1),
        "computed": "every number is computed from config.json and the formulas of e3prune/plan.py, not measured",
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(result: dict[str, Any]) -> str:
    """The plan as a table a person reads."""
    g = result["gpu"]
    where = (
        f"{result['nodes']} node(s) × {result['gpus_per_node']} {g['type']} ({g['memory_gib']:g} GiB, "
        f"{g['bf16_tflops']:g} TFLOPS bf16 dense, {g['interconnect']}; {g['usable_fraction']:.0%} usable), "
        f"MFU {result['mfu']:.0%}"
        if g
        else "one CPU process, fp32"
    )
    tok = result["tokens"]
    lines = [
        f"{result['model']}: {result['model_type']}, {result['parameters'] / 1e9:.2f} B parameters, "
        f"{result['layers']} layers; student {result['layers'] - result['removed_layers']} layers, "
        f"{result['student_parameters'] / 1e9:.2f} B",
        f"on {where}",
        f"tokens: teacher {tok['teacher']:,}, search {tok['search']:,}, distill {tok['distill']:,}, "
        f"eval {tok['eval']:,}, seq_len {tok['seq_len']}",
        f"teacher cache: {result['teacher_cache_bytes'] / 1e9:.2f} GB on disk "
        f"({result['teacher_cache_bytes_per_token']} B/token)",
        "",
        f"| step | memory {'per GPU' if g else '(RAM)'} | GPUs | est. time | how |",
        "|---|---|---|---|---|",
    ]
    for st in result["steps"]:
        if st["where"] == "cpu" and g:
            gpus = "CPU"
        elif not g:
            gpus = "—"
        elif st["step"] == "distill":
            gpus = f"{st['nodes']} × {st['gpus_per_node']}"
        else:
            gpus = str(st["gpus_per_node"])
        lines.append(
            f"| {st['step']} | {st['memory_gib']:.1f} GiB | {gpus} | {_duration(st['seconds'])} | {st['note']} |"
        )
    if g:
        lines.append(f"\ntotal estimated time: {_duration(result['total_seconds'])} (computed, not measured)")
    else:
        lines.append("\n(computed, not measured)")
    return "\n".join(lines) + "\n"
