"""Entropy-aware distillation of the hardened student (docs/method.md, Stage 5).

The student (a hardened checkpoint, all weights trainable by default) learns from the teacher's
cached top-K logits (``e3prune.teacher``); the teacher is never loaded. The loss is built once
from the settings (``e3prune.distill_loss``); the default entropy-aware one is
:func:`e3prune.losses.entropy_aware_kd_loss`:

    loss = Σ_t w_t · KL_t / T  +  λ · Σ_t (1 − h_t) · CE_t / T,   w_t = (ε + h_t)^γ / mean(w)

``loss="kd"`` is plain top-K KD (γ = 0, λ = 0) and ``loss="ce"`` plain fine-tuning on the next
token, the two baselines docs/method.md asks the recovery benchmark to compare against.

Distribution. The loop runs on :class:`accelerate.Accelerator`, so the same function runs in a
plain process, under ``accelerate launch`` (DDP or FSDP, see ``configs/accelerate/fsdp_gpu.yaml``)
and under torchrun. Each process reads its own slice of every global batch from the cache
(``e3prune.distill_inputs``), and the loss's token weights are normalised over the global batch
(``e3prune.distill_training``): 1 process with batch 2B and 2 processes with batch B train the
same model, up to float reduction order.

Resumption. Every ``checkpoint_every_steps`` the full training state (weights, AdamW, scheduler,
every process's RNG; ``Accelerator.save_state``) and the step metrics so far are written to
``checkpoint_dir``, a local directory or an ``s3://`` URI (``e3prune.resumable``: a kill at any
moment leaves the previous complete checkpoint). A rerun of the same command finds it and
continues at the same step and data position. The checkpoint records the settings it belongs
to; a rerun with other settings stops with an error instead of silently mixing two runs.

Entry points:
- :func:`distill` — the step as a library function, in one of however many processes there are
  (``callback`` receives every step's metrics on the main process, e.g. to forward them to MLflow).
- :func:`e3prune.launch.launch_distill` — what the component and the CLI call: starts the
  processes ``processes`` and ``nodes`` ask for (both ignored by :func:`distill` itself).
- ``e3prune distill --student ... --teacher-cache ... --output ...`` (CLI flags generated from
  :class:`DistillConfig`; through the launcher), also as ``accelerate launch -m e3prune.cli distill ...``.
- ``python -m e3prune.distill --config cfg.json`` (also under ``accelerate launch -m``).
- across nodes, as a Kubeflow Trainer TrainJob: :mod:`e3prune.trainjob` (its entry point
  ``distill_on_trainjob`` runs :func:`distill` on every rank under the runtime's torchrun; the
  Accelerator picks up the distributed environment). Checkpoints of a run over several nodes
  need a ``checkpoint_dir`` that all nodes share, an ``s3://`` URI (every rank writes its own RNG
  state, and FSDP its shard, into it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from e3prune import storage
from e3prune.config import PipelineParameter, StepConfig
from e3prune.distill_inputs import DistillInputs, check_distill_inputs
from e3prune.distill_loss import PARTS
from e3prune.distill_training import METRICS_FILE, Training, save_checkpoint, set_up, train_step
from e3prune.errors import E3PruneError
from e3prune.harden import PRUNING_FILE
from e3prune.model_io import model_dir
from e3prune.threads import follow_cpu_quota

log = logging.getLogger(__name__)

LossKind = Literal["entropy_kd", "kd", "ce"]
MetricsCallback = Callable[[dict[str, Any]], None]
SUMMARY_FILE = "distillation.json"


class DistillConfig(StepConfig):
    """What ``e3prune distill`` takes.

    Default loss: plain top-K KD (``kd``). The recovery benchmark (benchmarks/results/recovery.md)
    found it best at both budgets on held-out perplexity *and* agreement, and on the search split
    too; the entropy-aware loss (γ = 1, ε = 0.1, λ = 1, the paper's recipe) came second and
    CE-only last. γ, ε, λ apply when ``loss="entropy_kd"``. The learning
    rate, 3e-4, is a tenth of the reference model's pretraining peak (3e-3): recovery starts from
    trained weights and must not wash them out; for multi-billion-parameter students use ~1e-5.
    No weight decay by default: a short recovery run should pull the weights toward the teacher,
    not toward zero. The token budget, 524,288, is four passes over the sample step's default
    distill split: the recovery benchmark's best budget (the paper used 0.5 B tokens for Qwen3-32B).
    """

    student: str = Field(description="hardened checkpoint directory (the output of the harden step)")
    teacher_cache: str = Field(description="output of the teacher-logits step (must include the distill split)")
    output: str = Field(description="where to write the distilled checkpoint (local directory or s3:// URI)")
    loss: Annotated[LossKind, PipelineParameter("distill_loss")] = Field(
        "kd",
        description="kd (plain top-K KD; the default: tied with entropy_kd on held-out perplexity over two models, "
        "closer to the teacher on both, benchmarks/results/end-to-end.md), entropy_kd (E³ entropy-aware, Stage 5; "
        "better where the teacher is weak on the text) or ce (CE only)",
    )
    gamma: float = Field(1.0, ge=0, le=10, description="γ: exponent of the entropy weight (ε + h)^γ")
    epsilon: float = Field(0.1, gt=0, le=10, description="ε: floor of the entropy weight; confident tokens still count")
    ce_weight: float = Field(1.0, ge=0, le=100, description="λ: weight of the (1 − h)-weighted next-token CE term")
    distill_tokens: Annotated[int, PipelineParameter("distill_budget_tokens")] = Field(
        524_288,
        ge=1,
        le=10**12,  # beyond any real distillation (the paper's largest is 0.5 B tokens): a typo, not a plan
        description="tokens of distillation: steps = ceil(tokens / (global batch · seq_len))",
    )
    allow_repeat: Annotated[bool, PipelineParameter("distill_allow_repeat")] = Field(
        True, description="cycle over the distill split when the budget is larger than it"
    )
    batch_size: Annotated[int, PipelineParameter("distill_batch_size")] = Field(
        8, ge=1, le=4096, description="sequences per process per distillation micro-batch"
    )
    grad_accumulation_steps: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step")
    learning_rate: Annotated[float, PipelineParameter("distill_learning_rate")] = Field(
        3e-4, gt=0, le=1.0, description="peak AdamW learning rate of distillation"
    )
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
    # Read by the launcher (e3prune.launch), not by distill(): each launched process is one of them.
    processes: Annotated[int, PipelineParameter("distill_processes")] = Field(
        0,
        ge=0,
        le=1024,
        description="training processes on each node: 0 = one per visible GPU (1 on a CPU-only pod); "
        "N = N GPUs, or N gloo processes on CPU (at most the pod's CPUs)",
    )
    nodes: Annotated[int, PipelineParameter("distill_nodes")] = Field(
        1,
        ge=1,
        le=1024,
        description="nodes to distill on; above 1 the step runs a Kubeflow Trainer TrainJob",
    )

    def checkpoint_location(self) -> str:
        return self.checkpoint_dir or str(self.output).rstrip("/") + ".ckpt"


# --------------------------------------------------------------------------- the step


def distill(cfg: DistillConfig, callback: MetricsCallback | None = None) -> dict[str, Any]:
    """The step: check the inputs, set up (or resume), train, write the checkpoint.

    Returns the summary that is also written to ``distillation.json`` (and, when the student has a
    ``pruning.json``, under its ``distillation`` key). ``callback`` gets each step's metrics dict
    on the main process.
    """
    follow_cpu_quota()
    accelerator = _accelerator(cfg)
    started = time.time()
    inputs = _check_inputs(accelerator, cfg)
    training = set_up(accelerator, cfg, inputs)
    _train(accelerator, cfg, inputs, training, callback)
    summary = _summary(accelerator, cfg, inputs, training)
    _write_output(accelerator, training.model, cfg, inputs, summary, training.rows)
    summary["seconds"] = round(time.time() - started, 2)
    _finish(accelerator, cfg, inputs, summary)
    return summary


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


def _accelerator(cfg: DistillConfig):
    from accelerate import Accelerator

    # cpu=True without CUDA: accelerate then reads torchrun's environment as a gloo (MULTI_CPU) job;
    # without it, ranks on a CPU-only machine each train alone. The scheduler steps once per
    # optimizer step: its length is counted in optimizer steps already.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.grad_accumulation_steps,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        step_scheduler_with_optimizer=False,
    )


def _nodes() -> int:
    """Nodes in the job: torchrun (which ``accelerate launch`` uses) sets both sizes."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    return max(1, world // max(1, local))


def _check_inputs(accelerator, cfg: DistillConfig) -> DistillInputs:
    # The node's main process goes first: it downloads an S3 cache once for the node and probes
    # the checkpoint location; the others then find the cache in place.
    with accelerator.local_main_process_first():
        return check_distill_inputs(
            cfg, accelerator.num_processes, _nodes(), probe_checkpoints=accelerator.is_local_main_process
        )


def _train(accelerator, cfg: DistillConfig, inputs: DistillInputs, training: Training, callback) -> None:
    """Optimizer steps to the last, a checkpoint every ``checkpoint_every_steps``; the main process reports."""
    main, total = accelerator.is_main_process, inputs.plan.total_steps
    live = _live_metrics(inputs, training) if main else None
    bar = tqdm(total=total, initial=training.step, desc=f"distill [{cfg.loss}]", unit="step", disable=not main)
    training.run_started = time.time()
    while training.step < total:
        row = train_step(accelerator, cfg, inputs, training)
        if main:
            _report(cfg, total, row, bar, live, callback)
        if training.step % cfg.checkpoint_every_steps == 0 and training.step < total:
            save_checkpoint(accelerator, inputs.store, training, inputs.plan)
    bar.close()


def _live_metrics(inputs: DistillInputs, training: Training) -> Path | None:
    """A local copy of the metrics to follow during the run (the checkpoints hold the real record)."""
    if inputs.store.s3:
        return None
    live = Path(inputs.store.uri) / METRICS_FILE
    live.parent.mkdir(parents=True, exist_ok=True)
    live.write_text("".join(json.dumps(r) + "\n" for r in training.rows))
    return live


def _report(cfg: DistillConfig, total: int, row: dict, bar, live: Path | None, callback) -> None:
    if live is not None:
        with open(live, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    if callback is not None:
        callback(row)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.4f}", lr=f"{row['lr']:.2e}")
    if row["step"] % cfg.log_every_steps == 0 or row["step"] == total:
        parts = " ".join(f"{p} {row[p]:.4f}" for p in PARTS)
        log.info(
            "step %d/%d loss %.4f %s lr %.2e %.0f tok/s",
            row["step"], total, row["loss"], parts, row["lr"], row["tokens_per_second"],
        )  # fmt: skip


def _summary(accelerator, cfg: DistillConfig, inputs: DistillInputs, training: Training) -> dict[str, Any]:
    plan, rows, seconds = inputs.plan, training.rows, training.seconds()
    return {
        "format_version": 1,
        "student": cfg.student,
        "teacher_cache": cfg.teacher_cache,
        "teacher": inputs.cache.manifest.get("teacher"),
        **training.loss_fn.settings(),
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
        "resumed_from_step": training.start_step,
        "final": {k: rows[-1][k] for k in ("loss", *PARTS)} if rows else None,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(plan.total_steps * plan.tokens_per_step / max(seconds, 1e-9), 1),
        "config": cfg.model_dump(),
    }


def _save_dtype(config: Any) -> torch.dtype:
    """The dtype the student was saved in: training runs in fp32, the output keeps the source's size."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


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


def _finish(accelerator, cfg: DistillConfig, inputs: DistillInputs, summary: dict) -> None:
    """Drop the checkpoints (and the live metrics beside them) once the output is written."""
    if accelerator.is_main_process:
        if not inputs.store.s3:
            (Path(inputs.store.uri) / METRICS_FILE).unlink(missing_ok=True)
        inputs.store.remove()
        log.info(
            "distilled %d steps (%d tokens) in %.1fs; wrote %s",
            summary["steps"], summary["tokens"], summary["train_seconds"], cfg.output,
        )  # fmt: skip
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- entry points


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
