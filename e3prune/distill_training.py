"""The training state of a distillation on :class:`accelerate.Accelerator` (docs/method.md, Stage 5):
set up, resumed from and saved to checkpoints, and advanced one optimizer step at a time.

The entropy weights of a weighted loss are normalised over the whole global batch (an all-reduce
of Σ(ε + h)^γ), so a step's loss and gradient are one function of the global batch: 1 process
with batch 2B and 2 processes with batch B train the same model, up to float reduction order.
A checkpoint holds what ``Accelerator.save_state`` writes (weights, AdamW, scheduler, every
process's RNG), the step metrics so far and the progress record of ``e3prune.resumable``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from e3prune.adapters import get_adapter
from e3prune.distill_inputs import DistillInputs, StepPlan, read_sequences
from e3prune.distill_loss import PARTS, DistillLoss, build_loss
from e3prune.errors import E3PruneError
from e3prune.model_io import load_causal_lm
from e3prune.resumable import ResumableState

if TYPE_CHECKING:
    from e3prune.distill import DistillConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class Training:
    """The prepared student, AdamW, the schedule and the loss; where the run stands."""

    model: Any
    optimizer: Any
    scheduler: Any
    loss_fn: DistillLoss
    step: int = 0  # optimizer steps done
    start_step: int = 0  # the step this process started (or resumed) at
    rows: list[dict] = field(default_factory=list)  # every step's metrics so far
    seconds_before: float = 0.0  # training time of the runs before a resume
    run_started: float = field(default_factory=time.time)

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.run_started


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


def set_up(accelerator, cfg: DistillConfig, inputs: DistillInputs) -> Training:
    """Seed, load the student in fp32, build AdamW, the schedule and the loss; resume if a checkpoint exists."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    model = load_causal_lm(cfg.student, "float32", field="student")
    model.config.use_cache = False
    model.train()
    optimizer = _optimizer(_trainable_parameters(model, cfg.trainable), cfg)
    total, warmup = inputs.plan.total_steps, math.ceil(cfg.warmup_ratio * inputs.plan.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    training = Training(model, optimizer, scheduler, build_loss(cfg))
    _resume(accelerator, inputs.store, training, total)
    return training


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


def _resume(accelerator, store: ResumableState, training: Training, total_steps: int) -> None:
    """Load the newest checkpoint if there is one into ``training``.

    The main process finds it and tells the others; every process loads it (under FSDP each its
    own shard). A checkpoint of other settings or another process count is refused.
    """
    from accelerate.utils import broadcast_object_list

    latest = store.latest() if accelerator.is_main_process else None
    found = [str(latest) if latest is not None else None]
    if accelerator.num_processes > 1:
        found = broadcast_object_list(found)
    if found[0] is None:
        return
    ckpt = Path(found[0])
    progress = store.read(ckpt)  # refuses a checkpoint of other settings
    if progress["num_processes"] != accelerator.num_processes:
        raise E3PruneError(
            f"{ckpt} was written by {progress['num_processes']} processes, this run has "
            f"{accelerator.num_processes}; resume with the same launch settings",
            field="checkpoint_dir",
        )
    accelerator.load_state(str(ckpt))  # weights, AdamW, scheduler and every process's RNG
    training.rows = [json.loads(line) for line in (ckpt / METRICS_FILE).read_text().splitlines() if line]
    training.step = training.start_step = progress["step"]
    training.seconds_before = progress["seconds"]
    if accelerator.is_main_process:
        log.info("resuming the distillation at step %d of %d from %s", training.step, total_steps, ckpt)


def save_checkpoint(accelerator, store: ResumableState, training: Training, plan: StepPlan) -> None:
    """Every process writes its part into one staging directory; the main process publishes it."""
    staging = store.staging_dir(training.step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a run killed mid-save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in training.rows))
        progress = {
            "tokens": training.step * plan.tokens_per_step,
            "num_processes": accelerator.num_processes,
            "global_batch_sequences": plan.global_batch_sequences,
            "seconds": training.seconds(),
        }
        store.publish(staging, training.step, progress)
    accelerator.wait_for_everyone()


def train_step(accelerator, cfg: DistillConfig, inputs: DistillInputs, training: Training) -> dict[str, Any]:
    """One optimizer step on this process's slice of the global batch; returns (and keeps) its metrics row."""
    plan = inputs.plan
    start, count = plan.process_slice(training.step, accelerator.process_index)
    data = read_sequences(inputs.cache, start, count, plan.split_sequences)
    weight_mean = _global_weight_mean(accelerator, training.loss_fn, data)
    lr = training.scheduler.get_last_lr()[0]
    sums = _accumulate(accelerator, cfg, training, data, weight_mean)
    # The prepared model's parameters: under FSDP accelerate clips through the sharded module.
    grad_norm = accelerator.clip_grad_norm_(training.model.parameters(), cfg.max_grad_norm)
    training.optimizer.step()
    training.scheduler.step()
    training.optimizer.zero_grad(set_to_none=True)
    means = accelerator.reduce(sums / cfg.grad_accumulation_steps, "mean").tolist()
    training.step += 1
    done = (training.step - training.start_step) * plan.tokens_per_step
    row = {
        "step": training.step,
        "loss": means[0],
        **dict(zip(PARTS, means[1:])),
        "lr": lr,
        "grad_norm": _as_float(grad_norm),
        "tokens": training.step * plan.tokens_per_step,
        "tokens_per_second": round(done / max(time.time() - training.run_started, 1e-9), 1),
        "seconds": round(training.seconds(), 3),
    }
    training.rows.append(row)
    return row


def _global_weight_mean(accelerator, loss_fn: DistillLoss, data: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Mean token weight over the global batch (every micro-batch of every process): w has mean 1 over all of it."""
    terms = loss_fn.weight_terms(data)
    if terms is None:
        return None
    totals = accelerator.reduce(terms.to(accelerator.device), "sum")
    return totals[0] / totals[1]


def _accumulate(accelerator, cfg: DistillConfig, training: Training, data: dict, weight_mean) -> torch.Tensor:
    """Forward and backward over the step's micro-batches; the sums of the loss and its :data:`PARTS`."""
    b, device = cfg.batch_size, accelerator.device
    sums = torch.zeros(1 + len(PARTS), device=device)
    for j in range(cfg.grad_accumulation_steps):
        mb = {k: v[j * b : (j + 1) * b].to(device) for k, v in data.items()}
        with accelerator.accumulate(training.model):
            logits = training.model(input_ids=mb["input_ids"], use_cache=False).logits
            loss, parts = training.loss_fn(logits, mb, weight_mean)
            accelerator.backward(loss)
        sums += torch.tensor([loss.item(), *(parts[p] for p in PARTS)], device=device)
    return sums


def _as_float(value: Any) -> float:
    """A scalar as a float; FSDP2 returns the gradient norm as a DTensor."""
    full = getattr(value, "full_tensor", None)
    return float(full() if callable(full) else value)
