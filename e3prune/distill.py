"""Entropy-aware distillation of the hardened student (docs/method.md, Stage 5).

The student (a hardened checkpoint, all weights trainable by default) learns from the teacher's
cached top-K logits (``e3prune.teacher``); the teacher is never loaded. The loss is
:func:`e3prune.losses.entropy_aware_kd_loss`:

    loss = Σ_t w_t · KL_t / T  +  λ · Σ_t (1 − h_t) · CE_t / T,   w_t = (ε + h_t)^γ / mean(w)

``loss="kd"`` is plain top-K KD (γ = 0, λ = 0) and ``loss="ce"`` plain fine-tuning on the next
token, the two baselines docs/method.md asks the recovery benchmark to compare against.

Distribution. The loop runs on :class:`accelerate.Accelerator`, so the same function runs in a
plain process, under ``accelerate launch`` (DDP or FSDP, see ``configs/accelerate/fsdp_gpu.yaml``)
and under torchrun. Data are sharded here, not by a DataLoader: optimizer step s consumes the
global batch of G = batch_size × processes × grad_accumulation_steps sequences that starts at
sequence s·G of the cache's distill split, and process r takes the r-th contiguous slice of it.
(The sample step shuffled the documents before packing them, so contiguous reads are a random
order.) The entropy weights are normalised over that whole global batch (an all-reduce of Σ(ε + h)^γ),
so a step's loss and gradient are one function of the global batch: 1 process with batch 2B and
2 processes with batch B train the same model, up to float reduction order.

Resumption. Every ``checkpoint_every_steps`` the full training state (weights, AdamW, scheduler,
every process's RNG; ``Accelerator.save_state``) and the step metrics so far are written to
``checkpoint_dir``. Locally a checkpoint is staged in a hidden directory and renamed into place;
on S3 it goes to one of two alternating slots, each published with storage's completeness
marker, then a ``latest`` pointer. Either way a kill at any moment leaves the previous complete
checkpoint. A rerun of the same command finds it and continues at the same step and data
position. The checkpoint records the settings it belongs to; a rerun with other settings stops
with an error instead of silently mixing two runs.

Entry points:
- :func:`distill` — the step as a library function (``callback`` receives every step's metrics
  on the main process, e.g. to forward them to MLflow).
- ``e3prune distill --student ... --teacher-cache ... --output ...`` (CLI flags generated from
  :class:`DistillConfig`), also as ``accelerate launch -m e3prune.cli distill ...``.
- ``python -m e3prune.distill --config cfg.json`` (also under ``accelerate launch -m``).
- :func:`train_function` — for Kubeflow Trainer. The SDK ships the *source* of the function to
  the training pods and calls it with ``func_args`` as one positional dict, so the function
  imports what it needs itself (the image must have ``e3prune`` installed)::

      from kubeflow.trainer import CustomTrainer, TrainerClient
      from e3prune.distill import train_function

      TrainerClient().train(trainer=CustomTrainer(
          func=train_function,
          func_args={"student": "s3://models/run1/hardened", "teacher_cache": "s3://runs/run1/cache",
                     "output": "s3://models/run1/distilled", "distill_tokens": 500_000_000},
          num_nodes=1, resources_per_node={"gpu": 8},
      ))

  Every node runs it under torchrun; the Accelerator picks up the distributed environment.
  Checkpoints of a run over several nodes need a ``checkpoint_dir`` on a filesystem that all
  nodes share (every rank writes its own RNG state, and FSDP its shard, into it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from e3prune import storage
from e3prune.adapters import get_adapter
from e3prune.model_io import load_causal_lm, load_config, load_tokenizer, model_dir
from e3prune.config import StepConfig
from e3prune.data import tokenizer_fingerprint
from e3prune.errors import E3PruneError
from e3prune.harden import PRUNING_FILE
from e3prune.losses import entropy_aware_kd_loss, next_token_ce, teacher_entropy, topk_kl
from e3prune.teacher import TeacherTopK

log = logging.getLogger(__name__)

LossKind = Literal["entropy_kd", "kd", "ce"]
MetricsCallback = Callable[[dict[str, Any]], None]
SPLIT = "distill"
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "distillation.json"
# Settings that may change between a killed run and its rerun without changing what is trained.
NOT_RESUME_RELEVANT = {"output", "overwrite", "checkpoint_dir", "checkpoint_every_steps", "log_every_steps"}


class DistillConfig(StepConfig):
    """What ``e3prune distill`` takes.

    Default loss: plain top-K KD (``kd``). The recovery benchmark (benchmarks/results/recovery.md)
    found it best at both budgets on held-out perplexity *and* agreement, and on the search split
    too; the entropy-aware loss (γ = 1, ε = 0.1, λ = 1, the paper's recipe) came second and
    CE-only last. γ, ε, λ apply when ``loss="entropy_kd"``. The learning
    rate, 3e-4, is a tenth of the reference model's pretraining peak (3e-3): recovery starts from
    trained weights and must not wash them out; for multi-billion-parameter students use ~1e-5.
    No weight decay by default: a short recovery run should pull the weights toward the teacher,
    not toward zero. The token budget defaults to the sample step's default distill split, once
    through (the paper used 0.5 B tokens for Qwen3-32B).
    """

    student: str = Field(description="hardened checkpoint directory (the output of the harden step)")
    teacher_cache: str = Field(description="output of the teacher-logits step (must include the distill split)")
    output: str = Field(description="where to write the distilled checkpoint (local directory or s3:// URI)")
    loss: LossKind = Field("kd", description="kd (plain top-K KD, best measured), entropy_kd (Stage 5) or ce (CE only)")
    gamma: float = Field(1.0, ge=0, le=10, description="γ: exponent of the entropy weight (ε + h)^γ")
    epsilon: float = Field(0.1, gt=0, le=10, description="ε: floor of the entropy weight; confident tokens still count")
    ce_weight: float = Field(1.0, ge=0, le=100, description="λ: weight of the (1 − h)-weighted next-token CE term")
    distill_tokens: int = Field(
        131_072, ge=1, description="token budget: steps = ceil(tokens / (global batch·seq_len))"
    )
    allow_repeat: bool = Field(False, description="cycle over the distill split when the budget is larger than it")
    batch_size: int = Field(8, ge=1, le=4096, description="sequences per process per micro-batch")
    grad_accumulation_steps: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step")
    learning_rate: float = Field(3e-4, gt=0, le=1.0, description="peak AdamW learning rate")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of the steps with linear warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at this fraction of the peak")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW decoupled weight decay (matrices only)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global L2 norm)")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: the launcher's setting, else bf16 on CUDA GPUs that have it, else fp32"
    )
    trainable: Literal["all", "layers"] = Field("all", description="all weights, or the decoder layers only")
    checkpoint_every_steps: int = Field(200, ge=1, description="optimizer steps between resumable checkpoints")
    checkpoint_dir: str | None = Field(
        None, description="local directory or s3:// URI for resumable checkpoints (default: OUTPUT.ckpt, beside it)"
    )
    log_every_steps: int = Field(10, ge=1, description="steps between log lines (metrics.jsonl gets every step)")
    seed: int = 0
    overwrite: bool = False

    def checkpoint_location(self) -> str:
        return self.checkpoint_dir or str(self.output).rstrip("/") + ".ckpt"


# --------------------------------------------------------------------------- the loss


def distill_loss(
    kind: LossKind,
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    gamma: float,
    epsilon: float,
    ce_weight: float,
    weight_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss on one micro-batch and its parts for logging (see the module docstring).

    ``batch`` holds ``input_ids`` (B, S), ``values``/``ids`` (B, S, K) and ``lse`` (B, S).
    """
    if kind == "ce":
        loss = next_token_ce(student_logits, batch["input_ids"]).mean()
        with torch.no_grad():  # agreement with the teacher is still worth watching
            kl = topk_kl(student_logits, batch["values"], batch["ids"], batch["lse"]).mean().item()
            h = teacher_entropy(batch["values"], batch["lse"]).mean().item()
        return loss, {"kl": kl, "ce": loss.item(), "entropy": h}
    if kind == "kd":
        gamma, ce_weight, weight_mean = 0.0, 0.0, None
    return entropy_aware_kd_loss(
        student_logits,
        batch["input_ids"],
        batch["values"],
        batch["ids"],
        batch["lse"],
        gamma,
        epsilon,
        ce_weight,
        weight_mean=weight_mean,
    )


def loss_parameters(cfg: DistillConfig) -> dict[str, Any]:
    """The loss as it was applied (``kd`` and ``ce`` fix some of γ, ε, λ), for the record."""
    if cfg.loss == "ce":
        return {"loss": "ce", "gamma": None, "epsilon": None, "ce_weight": None}
    if cfg.loss == "kd":
        return {"loss": "kd", "gamma": 0.0, "epsilon": None, "ce_weight": 0.0}
    return {"loss": "entropy_kd", "gamma": cfg.gamma, "epsilon": cfg.epsilon, "ce_weight": cfg.ce_weight}


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps`` (the first step already moves: (s + 1) / warmup), then a
    cosine from 1 down to ``min_lr_ratio`` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- data layout


@dataclass(frozen=True)
class StepPlan:
    """How the token budget maps onto optimizer steps and cache sequences."""

    total_steps: int
    global_batch_sequences: int  # G = batch_size × num_processes × grad_accumulation_steps
    sequences_per_process: int  # batch_size × grad_accumulation_steps
    seq_len: int
    split_sequences: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_sequences * self.seq_len

    def process_slice(self, step: int, rank: int) -> tuple[int, int]:
        """(first sequence, count) that process ``rank`` trains on at optimizer step ``step``."""
        start = step * self.global_batch_sequences + rank * self.sequences_per_process
        return start % self.split_sequences, self.sequences_per_process


def plan_steps(cfg: DistillConfig, num_processes: int, seq_len: int, split_sequences: int) -> StepPlan:
    """Steps for the budget; without ``allow_repeat`` the steps must fit in the split."""
    per_process = cfg.batch_size * cfg.grad_accumulation_steps
    g = per_process * num_processes
    total_steps = math.ceil(cfg.distill_tokens / (g * seq_len))
    if not cfg.allow_repeat and total_steps * g > split_sequences:
        fits = (split_sequences // g) * g * seq_len
        raise E3PruneError(
            f"{cfg.distill_tokens:,} tokens need {total_steps} steps of {g} sequences ({total_steps * g} sequences of "
            f"{seq_len} tokens), but the cache's distill split has {split_sequences}; lower the budget to at most "
            f"{fits:,} tokens, sample a larger distill split, or set allow_repeat to cycle over it",
            field="distill_tokens",
        )
    return StepPlan(total_steps, g, per_process, seq_len, split_sequences)


def read_sequences(cache: TeacherTopK, start: int, count: int, split_sequences: int) -> dict[str, torch.Tensor]:
    """``count`` sequences of the distill split from ``start``, wrapping around its end."""
    parts, pos, left = [], start % split_sequences, count
    while left:
        take = min(left, split_sequences - pos)
        parts.append(cache.batch(SPLIT, pos, take))
        left, pos = left - take, 0
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --------------------------------------------------------------------------- checkpoints


class CheckpointStore:
    """Where resumable checkpoints live: a local directory (``step-N`` subdirectories, the newest
    kept) or an S3 prefix (``slot-0`` / ``slot-1`` alternating, plus a ``latest`` pointer).

    A checkpoint holds what ``Accelerator.save_state`` writes, ``progress.json`` (step, settings,
    layout) and ``metrics.jsonl`` (every step so far). Processes on one node share a local
    staging directory; only the main process publishes.
    """

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.s3 = storage.is_s3(uri)
        self._slot: int | None = None  # S3: the slot holding the newest complete checkpoint

    # -- validation
    def check_writable(self) -> None:
        """Fail now, not after hours of training, when checkpoints cannot be written."""
        if self.s3:
            storage.check_output(self.uri, overwrite=True, field="checkpoint_dir")  # bucket reachable
            return
        root = Path(self.uri)
        missing = []
        p = root
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"probe")
            probe.unlink()
        except OSError as exc:
            raise E3PruneError(
                f"cannot write checkpoints to {root}: {exc.strerror or exc}; choose a writable checkpoint_dir",
                field="checkpoint_dir",
            ) from None
        finally:
            for d in missing:  # leave no trace of a check: the run may still fail validation
                try:
                    d.rmdir()
                except OSError:
                    pass

    # -- local layout
    def _local_steps(self) -> list[Path]:
        root = Path(self.uri)
        if not root.is_dir():
            return []
        done = [d for d in root.glob("step-*") if (d / PROGRESS_FILE).is_file()]
        return sorted(done, key=lambda d: int(d.name.split("-")[1]))

    def staging_dir(self, step: int) -> Path:
        """A directory every process of this node can write its part of the checkpoint into."""
        if self.s3:
            key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            return storage.cache_root() / "checkpoints" / key / f".step-{step:08d}.partial"
        return Path(self.uri) / f".step-{step:08d}.partial"

    def publish(self, staging: Path, step: int) -> None:
        """Make the staged checkpoint the newest one (main process only)."""
        if not self.s3:
            final = Path(self.uri) / f"step-{step:08d}"
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)  # atomic: before it the previous checkpoint is the newest
            for old in self._local_steps():
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
            return
        slot = 0 if self._slot is None else 1 - self._slot
        with storage.output_dir(f"{self.uri}/slot-{slot}", overwrite=True, field="checkpoint_dir") as up:
            for entry in staging.iterdir():
                shutil.move(str(entry), str(up / entry.name))
        with storage.output_dir(f"{self.uri}/latest", overwrite=True, field="checkpoint_dir") as up:
            (up / "latest.json").write_text(json.dumps({"slot": slot, "step": step}))
        self._slot = slot
        shutil.rmtree(staging, ignore_errors=True)

    def latest(self) -> Path | None:
        """Local directory of the newest complete checkpoint, or None (main process only)."""
        if not self.s3:
            steps = self._local_steps()
            return steps[-1] if steps else None
        candidates: list[tuple[int, int, Path]] = []
        try:
            pointer_dir = storage.input_dir(f"{self.uri}/latest", "checkpoint_dir")
            pointer = json.loads((pointer_dir / "latest.json").read_text())
            slots = [int(pointer["slot"])]
        except E3PruneError:
            slots = [0, 1]  # no pointer, or its upload was cut: look at both slots
        for slot in slots:
            try:
                path = storage.input_dir(f"{self.uri}/slot-{slot}", "checkpoint_dir")
            except E3PruneError as exc:
                log.info("no usable checkpoint in slot %d: %s", slot, exc)
                continue
            candidates.append((json.loads((path / PROGRESS_FILE).read_text())["step"], slot, path))
        if not candidates:
            return None
        _, self._slot, path = max(candidates)
        return path

    def remove(self) -> None:
        """Drop the checkpoints after the output is written (local only; see the module docstring)."""
        if self.s3:
            log.info("the checkpoints in %s are kept; a rerun with the same settings finds the run finished", self.uri)
            return
        root = Path(self.uri)
        for d in self._local_steps():
            shutil.rmtree(d, ignore_errors=True)
        (root / METRICS_FILE).unlink(missing_ok=True)
        try:
            root.rmdir()
        except OSError:
            pass  # someone else's files are in there: leave them


# --------------------------------------------------------------------------- validation


@dataclass
class DistillInputs:
    cache: TeacherTopK
    plan: StepPlan
    tokenizer: Any
    student_config: Any
    store: CheckpointStore


def resolve_mixed_precision(setting: str) -> str | None:
    """``no`` or ``bf16`` for the Accelerator; None keeps what ``accelerate launch`` configured."""
    has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting == "bf16" and not has_bf16:
        raise E3PruneError(
            "bf16 needs a CUDA GPU with bf16 support (Ampere or newer); use auto or no", field="mixed_precision"
        )
    if setting == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            return None
        return "bf16" if has_bf16 else "no"
    return setting


def check_distill_inputs(
    cfg: DistillConfig, num_processes: int, num_machines: int = 1, probe_checkpoints: bool = True
) -> DistillInputs:
    """Everything that can be checked before loading weights; raises :class:`E3PruneError`.

    ``probe_checkpoints``: write and delete a probe file in the checkpoint location. One process
    a node does it; several at once would delete the directory under each other's probes.
    """
    config = load_config(cfg.student, field="student")
    tokenizer = load_tokenizer(cfg.student)
    if tokenizer is None:
        raise E3PruneError(
            f"{cfg.student} has no tokenizer; the distilled checkpoint needs one and the cache is "
            "checked against it (save the tokenizer with the hardened model)",
            field="student",
        )
    cache = TeacherTopK(cfg.teacher_cache)
    m = cache.manifest
    if tokenizer_fingerprint(tokenizer) != m["tokenizer"]["fingerprint"]:
        raise E3PruneError(
            f"the teacher cache was made with another tokenizer ({m['tokenizer'].get('path')}) than the student's "
            f"({cfg.student}); build the cache from data sampled with the student's tokenizer",
            field="teacher_cache",
        )
    if m["vocab_size"] != config.vocab_size:
        raise E3PruneError(
            f"the cache's vocabulary ({m['vocab_size']}) differs from the student's ({config.vocab_size})",
            field="teacher_cache",
        )
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and cache.seq_len > max_pos:
        raise E3PruneError(
            f"sequence layout does not match: the cache's sequences have {cache.seq_len} tokens, "
            f"the student has {max_pos} positions",
            field="teacher_cache",
        )
    n = m["splits"].get(SPLIT, {}).get("sequences", 0)
    if n == 0:
        raise E3PruneError(
            f"the teacher cache has no {SPLIT!r} split (or it is empty); build it with splits including {SPLIT}",
            field="teacher_cache",
        )
    plan = plan_steps(cfg, num_processes, cache.seq_len, n)
    storage.check_output(cfg.output, cfg.overwrite)
    store = CheckpointStore(cfg.checkpoint_location())
    if not store.s3 and not storage.is_s3(cfg.output):
        out, ckpt = Path(cfg.output).resolve(), Path(store.uri).resolve()
        if ckpt == out or out in ckpt.parents:
            raise E3PruneError(
                f"{ckpt} is inside the output {out}, which is replaced at the end; put it beside",
                field="checkpoint_dir",
            )
    if store.s3 and num_machines > 1:
        raise E3PruneError(
            "S3 checkpoints hold one node's state; a run over several nodes needs a checkpoint_dir "
            "on a filesystem all nodes share",
            field="checkpoint_dir",
        )
    if probe_checkpoints:
        store.check_writable()
    return DistillInputs(cache, plan, tokenizer, config, store)


# --------------------------------------------------------------------------- the step


def _nodes() -> int:
    """Nodes in the job: torchrun (which ``accelerate launch`` uses) sets both sizes."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    return max(1, world // max(1, local))


def _trainable_parameters(model: torch.nn.Module, trainable: str) -> list[torch.nn.Parameter]:
    if trainable == "layers":
        model.requires_grad_(False)
        get_adapter(model).decoder_layers(model).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(params: list[torch.nn.Parameter], cfg: DistillConfig) -> torch.optim.AdamW:
    # Decay matrices only; norms and biases (1-d) are scales and offsets that decay would distort.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(0.9, 0.95))


def _as_float(value: Any) -> float:
    """A scalar as a float; FSDP2 returns the gradient norm as a DTensor."""
    full = getattr(value, "full_tensor", None)
    return float(full() if callable(full) else value)


def _save_dtype(config: Any) -> torch.dtype:
    """The dtype the student was saved in: training runs in fp32, the output keeps the source's size."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def distill(cfg: DistillConfig, callback: MetricsCallback | None = None) -> dict[str, Any]:
    """The step: validate, train (resuming from a checkpoint if there is one), write the checkpoint.

    Returns the summary that is also written to ``distillation.json`` (and, when the student has a
    ``pruning.json``, under its ``distillation`` key). ``callback`` gets each step's metrics dict
    on the main process.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    # cpu=True without CUDA: accelerate then reads torchrun's environment as a gloo (MULTI_CPU) job;
    # without it, ranks on a CPU-only machine each train alone. The scheduler steps once per
    # optimizer step: its length is counted in optimizer steps already.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.grad_accumulation_steps,
        mixed_precision=mixed_precision,
        step_scheduler_with_optimizer=False,
    )
    # The node's main process goes first: it downloads an S3 cache once for the node and probes
    # the checkpoint location; the others then find the cache in place.
    with accelerator.local_main_process_first():
        inputs = check_distill_inputs(
            cfg, accelerator.num_processes, _nodes(), probe_checkpoints=accelerator.is_local_main_process
        )
    cache, plan, store = inputs.cache, inputs.plan, inputs.store
    main = accelerator.is_main_process
    resumable = cfg.model_dump(exclude=NOT_RESUME_RELEVANT)
    started = time.time()

    set_seed(cfg.seed)
    model = load_causal_lm(cfg.student, "float32", field="student")
    model.config.use_cache = False
    model.train()
    params = _trainable_parameters(model, cfg.trainable)
    optimizer = _optimizer(params, cfg)
    warmup = math.ceil(cfg.warmup_ratio * plan.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.total_steps, warmup, cfg.min_lr_ratio)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_step, rows, seconds_before = _resume(accelerator, store, resumable, plan.total_steps)
    live = None if store.s3 or not main else Path(store.uri) / METRICS_FILE
    if live is not None:  # a local copy to follow during the run; the checkpoint holds the real record
        live.parent.mkdir(parents=True, exist_ok=True)
        live.write_text("".join(json.dumps(r) + "\n" for r in rows))

    device = accelerator.device
    weighted = cfg.loss == "entropy_kd" and cfg.gamma != 0
    b, accum = cfg.batch_size, cfg.grad_accumulation_steps
    run_started = time.time()
    bar = tqdm(total=plan.total_steps, initial=start_step, desc=f"distill [{cfg.loss}]", unit="step", disable=not main)
    step = start_step
    while step < plan.total_steps:
        start, count = plan.process_slice(step, accelerator.process_index)
        data = read_sequences(cache, start, count, plan.split_sequences)
        weight_mean = None
        if weighted:
            # Σ(ε + h)^γ and the token count over the global batch: w has mean 1 over all of it.
            raw = (cfg.epsilon + teacher_entropy(data["values"], data["lse"])) ** cfg.gamma
            totals = accelerator.reduce(torch.stack([raw.sum(), torch.tensor(float(raw.numel()))]).to(device), "sum")
            weight_mean = totals[0] / totals[1]
        lr = scheduler.get_last_lr()[0]
        sums = torch.zeros(4, device=device)  # loss, kl, ce, entropy summed over micro-batches
        for j in range(accum):
            mb = {k: v[j * b : (j + 1) * b].to(device) for k, v in data.items()}
            with accelerator.accumulate(model):
                logits = model(input_ids=mb["input_ids"], use_cache=False).logits
                loss, stats = distill_loss(cfg.loss, logits, mb, cfg.gamma, cfg.epsilon, cfg.ce_weight, weight_mean)
                accelerator.backward(loss)
            sums += torch.tensor([loss.item(), stats["kl"], stats["ce"], stats["entropy"]], device=device)
        # The prepared model's parameters: under FSDP accelerate clips through the sharded module.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        means = accelerator.reduce(sums / accum, "mean").tolist()
        step += 1
        elapsed = time.time() - run_started
        row = {
            "step": step,
            "loss": means[0],
            "kl": means[1],
            "ce": means[2],
            "entropy": means[3],
            "lr": lr,
            "grad_norm": _as_float(grad_norm),
            "tokens": step * plan.tokens_per_step,
            "tokens_per_second": round((step - start_step) * plan.tokens_per_step / max(elapsed, 1e-9), 1),
            "seconds": round(seconds_before + elapsed, 3),
        }
        rows.append(row)
        if main:
            if live is not None:
                with open(live, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            if callback is not None:
                callback(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every_steps == 0 or step == plan.total_steps:
                log.info(
                    "step %d/%d loss %.4f kl %.4f ce %.4f lr %.2e %.0f tok/s",
                    step,
                    plan.total_steps,
                    row["loss"],
                    row["kl"],
                    row["ce"],
                    lr,
                    row["tokens_per_second"],
                )
        if step % cfg.checkpoint_every_steps == 0 and step < plan.total_steps:
            progress = {
                "step": step,
                "tokens": step * plan.tokens_per_step,
                "num_processes": accelerator.num_processes,
                "global_batch_sequences": plan.global_batch_sequences,
                "seconds": seconds_before + elapsed,
                "config": resumable,
            }
            _save_checkpoint(accelerator, store, step, progress, rows)
    bar.close()
    train_seconds = seconds_before + time.time() - run_started

    summary = {
        "format_version": 1,
        "student": cfg.student,
        "teacher_cache": cfg.teacher_cache,
        "teacher": cache.manifest.get("teacher"),
        **loss_parameters(cfg),
        "distill_tokens": cfg.distill_tokens,
        "tokens": plan.total_steps * plan.tokens_per_step,
        "steps": plan.total_steps,
        "global_batch_sequences": plan.global_batch_sequences,
        "seq_len": plan.seq_len,
        "repeated_data": plan.total_steps * plan.global_batch_sequences > plan.split_sequences,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "trainable": cfg.trainable,
        "learning_rate": cfg.learning_rate,
        "resumed_from_step": start_step,
        "final": {k: rows[-1][k] for k in ("loss", "kl", "ce", "entropy")} if rows else None,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(plan.total_steps * plan.tokens_per_step / max(train_seconds, 1e-9), 1),
        "config": cfg.model_dump(),
    }
    _write_output(accelerator, model, cfg, inputs, summary, rows)
    summary["seconds"] = round(time.time() - started, 2)
    if main:
        store.remove()
        log.info(
            "distilled %d steps (%d tokens) in %.1fs; wrote %s",
            plan.total_steps,
            summary["tokens"],
            train_seconds,
            cfg.output,
        )
    accelerator.wait_for_everyone()
    return summary


def _resume(accelerator, store: CheckpointStore, resumable: dict, total_steps: int) -> tuple[int, list[dict], float]:
    """Load the newest checkpoint if there is one: (start step, metrics rows so far, seconds so far).

    The main process finds it and tells the others; every process loads it (under FSDP each its
    own shard). A checkpoint of other settings or another process count is refused.
    """
    from accelerate.utils import broadcast_object_list

    latest = store.latest() if accelerator.is_main_process else None
    found = [str(latest) if latest is not None else None]
    if accelerator.num_processes > 1:
        found = broadcast_object_list(found)
    if found[0] is None:
        return 0, [], 0.0
    ckpt = Path(found[0])
    progress = json.loads((ckpt / PROGRESS_FILE).read_text())
    if progress["config"] != resumable:
        changed = sorted(k for k in resumable if progress["config"].get(k) != resumable[k])
        raise E3PruneError(
            f"{ckpt} belongs to a run with other settings ({', '.join(changed)}); remove it or "
            "choose another checkpoint_dir",
            field="checkpoint_dir",
        )
    if progress["num_processes"] != accelerator.num_processes:
        raise E3PruneError(
            f"{ckpt} was written by {progress['num_processes']} processes, this run has "
            f"{accelerator.num_processes}; resume with the same launch settings",
            field="checkpoint_dir",
        )
    accelerator.load_state(str(ckpt))  # weights, AdamW, scheduler and every process's RNG
    rows = [json.loads(line) for line in (ckpt / METRICS_FILE).read_text().splitlines() if line]
    if accelerator.is_main_process:
        log.info("resuming the distillation at step %d of %d from %s", progress["step"], total_steps, ckpt)
    return progress["step"], rows, progress["seconds"]


def _save_checkpoint(accelerator, store: CheckpointStore, step: int, progress: dict, rows: list[dict]) -> None:
    """Every process writes its part into one staging directory; the main process publishes it."""
    staging = store.staging_dir(step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a run killed mid-save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (staging / PROGRESS_FILE).write_text(json.dumps(progress, indent=1))  # last: marks the stage complete
        store.publish(staging, step)
    accelerator.wait_for_everyone()


def _write_output(
    accelerator, model, cfg: DistillConfig, inputs: DistillInputs, summary: dict, rows: list[dict]
) -> None:
    """Save the unwrapped student (in its source dtype), tokenizer, metrics and records; main process only."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP: every process takes part
    if accelerator.is_main_process:
        dtype = _save_dtype(inputs.student_config)
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True
        unwrapped.config.dtype = dtype
        with storage.output_dir(cfg.output, cfg.overwrite) as out:
            unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
            inputs.tokenizer.save_pretrained(out)
            (out / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            source_pruning = model_dir(cfg.student, "student") / PRUNING_FILE
            if source_pruning.is_file():
                pruning = json.loads(source_pruning.read_text())
                pruning["distillation"] = {k: v for k, v in summary.items() if k != "config"}
                (out / PRUNING_FILE).write_text(json.dumps(pruning, indent=2) + "\n")
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- entry points


def train_function(config_dict: dict) -> dict:
    """Kubeflow Trainer entry point: ``CustomTrainer(func=train_function, func_args={...})``.

    Self-contained on purpose: the SDK runs this function's source in a fresh script, without
    the rest of this module, so everything it needs is imported here.
    """
    import logging

    from e3prune.distill import DistillConfig, distill

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return distill(DistillConfig.parse(config_dict))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m e3prune.distill --config cfg.json`` (also under ``accelerate launch -m``)."""
    from accelerate import PartialState

    parser = argparse.ArgumentParser(prog="python -m e3prune.distill", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file with DistillConfig's settings")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            raise E3PruneError(f"cannot read {args.config} as JSON: {exc}", field="config") from None
        summary = distill(DistillConfig.parse(data))
    except E3PruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(json.dumps({k: summary[k] for k in ("steps", "tokens", "final", "resumed_from_step")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
