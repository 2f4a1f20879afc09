"""What a distillation trains on (docs/method.md, Stage 5): its inputs checked against each other
before any weights load, and the token budget laid out on optimizer steps and cache sequences.

Data are sharded here, not by a DataLoader: optimizer step s consumes the global batch of
G = batch_size × processes × grad_accumulation_steps sequences that starts at sequence s·G of the
cache's distill split, and process r takes the r-th contiguous slice of it. (The sample step
shuffled the documents before packing them, so contiguous reads are a random order.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from e3prune import storage
from e3prune.data import tokenizer_fingerprint
from e3prune.errors import E3PruneError
from e3prune.model_io import load_config, load_tokenizer
from e3prune.resumable import ResumableState, resume_key
from e3prune.teacher import TeacherTopK

if TYPE_CHECKING:
    from e3prune.distill import DistillConfig

SPLIT = "distill"
# Settings that may change between a killed run and its rerun without changing what is trained.
# processes and nodes: the launch settings; the checkpoint records the process count it was written
# by and a resume with another is refused (distill_training._resume), whatever the settings said.
NOT_RESUME_RELEVANT = {
    "output",
    "overwrite",
    "checkpoint_dir",
    "checkpoint_every_steps",
    "log_every_steps",
    "processes",
    "nodes",
}


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


@dataclass
class DistillInputs:
    cache: TeacherTopK
    plan: StepPlan
    tokenizer: Any
    student_config: Any
    store: ResumableState


def checkpoint_store(cfg: DistillConfig) -> ResumableState:
    """The run's checkpoints (``e3prune.resumable``), keyed by every setting that changes what is trained."""
    return ResumableState(cfg.checkpoint_location(), resume_key(cfg, NOT_RESUME_RELEVANT), field="checkpoint_dir")


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
    _check_cache(cfg, cache, tokenizer, config)
    plan = plan_steps(cfg, num_processes, cache.seq_len, cache.manifest["splits"][SPLIT]["sequences"])
    storage.check_output(cfg.output, cfg.overwrite)
    store = checkpoint_store(cfg)
    _check_checkpoint_location(cfg, store, num_machines)
    if probe_checkpoints:
        store.check_writable()
    return DistillInputs(cache, plan, tokenizer, config, store)


def _check_cache(cfg: DistillConfig, cache: TeacherTopK, tokenizer: Any, config: Any) -> None:
    """The cache was made from the student's tokenizer and vocabulary, fits its positions, has a distill split.

    The student is not the cache's teacher (it is a pruned copy), so the teacher's fingerprint is not compared.
    """
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
    cache.check_positions(config, "student")
    if m["splits"].get(SPLIT, {}).get("sequences", 0) == 0:
        raise E3PruneError(
            f"the teacher cache has no {SPLIT!r} split (or it is empty); build it with splits including {SPLIT}",
            field="teacher_cache",
        )


def _check_checkpoint_location(cfg: DistillConfig, store: ResumableState, num_machines: int) -> None:
    """Checkpoints beside the output, not in it; on S3 only for a run on one node."""
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
