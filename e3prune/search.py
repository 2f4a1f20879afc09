"""Gumbel-TopK mask search (docs/method.md, Stage 3).

Only the keep-logits θ ∈ ℝᴸ train; every model weight is frozen, so the backward pass computes
activation gradients only. Each step samples a straight-through top-kₜ mask of θ plus Gumbel
noise (``e3prune.gumbel_topk``, where the equations are) and gates every layer with it,
h ← h + m_l · (F_l(h) − h) (``e3prune.masking``). The loss is the per-token KL between the cached
teacher top-K (+ tail) and the student, averaged over tokens, plus λ·CE on the next token.
θ is initialised from the KL importance of Stage 2 (standardised, times ``init_scale``).

The final keep-set is chosen among a few candidates (docs/method.md "Final selection"): the top-k
of θ, the most frequent hard masks of the last steps, single swaps across the keep/remove boundary
of θ and the top-k of earlier θ. They are scored on the *held-back* part of the search split, its
last ``final_sequences`` sequences, which the search's training steps and its KL initialisation
never read (:func:`split_search_data`).

The state (θ, the optimiser, the Gumbel generator, the data order, the trajectory, the step) is
saved every ``checkpoint_every_steps`` to ``state`` (a local directory or an ``s3://`` URI;
``e3prune.resumable``: tensors as safetensors, the rest as JSON, never a pickle), so a killed
search, or a retried pod, resumes and ends with the same mask as an uninterrupted one.

:func:`search_mask` is the step: set up (check the inputs, load) → resume or start → the steps →
choose the keep-set → write ``search.json`` and ``trajectory.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator
from tqdm.auto import tqdm

from e3prune import storage
from e3prune.config import PipelineParameter, StepConfig, open_unit_interval
from e3prune.data import tokenizer_fingerprint
from e3prune.errors import E3PruneError
from e3prune.gumbel_topk import SharedScaleAdam, gumbel_topk_mask, keep_count, sample_gumbel, temperature
from e3prune.losses import next_token_ce, topk_kl
from e3prune.masking import gated_layers
from e3prune.model_io import load_config, load_tokenizer
from e3prune.placement import DEVICE_HELP, Device, check_device, load_placed
from e3prune.reference import default_model
from e3prune.resumable import ResumableState, load_tree, resume_key, save_tree
from e3prune.selection import Calibration, Meter, kl_importance, masked_loss, n_remove_for
from e3prune.teacher import TeacherTopK
from e3prune.threads import follow_cpu_quota

log = logging.getLogger(__name__)

SEARCH_STATE = "search_state"  # search_state.json + search_state.safetensors in every checkpoint
# Settings that may change between a killed search and its rerun without changing its result.
NOT_RESUME_RELEVANT = {"output", "overwrite", "state", "checkpoint_every_steps"}
MAX_SEARCH_TOKENS = 10**12  # far beyond any real search (the default is 0.6 M tokens): a typo, not a plan


SelectionMethod = Literal["e3", "best", "sleb", "block_influence", "angular", "kl_oneshot", "last", "random"]


class SearchConfig(StepConfig):
    """What ``e3prune search`` takes. Defaults were chosen on the search split (benchmarks/selection.py)."""

    model: str = Field(default_factory=default_model, description="checkpoint whose layers are searched")
    teacher_cache: str = Field(description="output of the teacher-logits step (must include the search split)")
    output: str = Field(description="where to write search.json and trajectory.jsonl")
    remove_ratio: Annotated[float, AfterValidator(open_unit_interval), PipelineParameter()] = Field(
        0.25, description="fraction of decoder layers to remove, in (0, 1); rounded to whole layers"
    )
    selection_method: Annotated[SelectionMethod, PipelineParameter()] = Field(
        "best",
        description="best (E³ and SLEB, whichever has the lower KL on held-back data; the default, "
        "benchmarks/results/end-to-end.md), e3 (the Gumbel-TopK search alone) "
        "or a baseline: sleb, block_influence, angular, kl_oneshot, last, random",
    )
    search_tokens: Annotated[int, PipelineParameter("search_budget_tokens")] = Field(
        614_400,
        ge=1,
        le=MAX_SEARCH_TOKENS,
        description="tokens the Gumbel-TopK search trains on (steps × batch × seq_len)",
    )
    batch_size: Annotated[int, PipelineParameter("search_batch_size")] = Field(
        8, ge=1, description="sequences per search step"
    )
    learning_rate: Annotated[float, PipelineParameter("search_learning_rate")] = Field(
        0.05, gt=0, le=10, description="learning rate of the keep-logits θ"
    )
    optimizer: Literal["shared_adam", "adam"] = Field(
        "shared_adam", description="shared_adam: one scale for all keep-logits (see SharedScaleAdam); adam: per-logit"
    )
    tau_start: Annotated[float, PipelineParameter("search_tau_start")] = Field(
        1.0, gt=0, description="Gumbel-TopK temperature at the start"
    )
    tau_end: Annotated[float, PipelineParameter("search_tau_end")] = Field(
        0.05, gt=0, description="Gumbel-TopK temperature at the end (at most the start temperature)"
    )
    curriculum: bool = Field(
        False,
        description="lower k from L-1 to k over curriculum_fraction of the steps (the paper's); off by default: "
        "on the reference model it found the same sets at 25 % and 40 % and made early steps dearer",
    )
    curriculum_fraction: float = Field(0.5, gt=0, le=1)
    init: Literal["kl", "zeros"] = "kl"
    init_scale: float = Field(1.0, ge=0)
    init_sequences: int = Field(32, ge=1, description="search-split sequences for the KL initialisation")
    ce_weight: float = Field(0.0, ge=0, description="λ of the optional next-token CE term")
    final_selection: bool = True
    final_sequences: int = Field(
        128,
        ge=1,
        description="held-back sequences (the search split's last) that score the final candidates; the search "
        "never trains on them (at most half the split)",
    )
    final_swaps: int = Field(3, ge=0, description="r: swaps between the r weakest kept and r strongest removed")
    final_window_fraction: float = Field(
        0.25, gt=0, le=1, description="last fraction of steps whose masks are candidates"
    )
    checkpoint_every_steps: int = Field(25, ge=1)
    state: str | None = Field(
        None, description="local directory or s3:// URI for the resumable state (default: OUTPUT.state, beside it)"
    )
    seed: Annotated[int, PipelineParameter("search_seed")] = Field(0, ge=0, description="seed of the Gumbel noise")
    device: Device = Field(
        "auto", description=DEVICE_HELP + "; θ, the optimiser and the losses stay fp32 (θ on the CPU) wherever it runs"
    )
    overwrite: bool = False

    @model_validator(mode="after")
    def _best_needs_held_back(self) -> SearchConfig:
        if self.selection_method == "best" and not self.final_selection:
            raise ValueError(
                "selection_method best judges E³ and SLEB on the search's held-back sequences; "
                "keep final_selection true (without it the search trains on them)"
            )
        return self

    @field_validator("tau_end")
    @classmethod
    def _tau(cls, tau_end: float, info: ValidationInfo) -> float:
        tau_start = info.data.get("tau_start")
        if tau_start is not None and tau_end > tau_start:
            raise ValueError(f"must not exceed tau_start ({tau_start}), got {tau_end}")
        return tau_end


# --------------------------------------------------------------------------- final selection


def final_candidates(
    theta: torch.Tensor,
    k: int,
    recent_masks: list[tuple[int, ...]],
    swaps: int,
    earlier_thetas: list[tuple[str, torch.Tensor]] = (),
) -> list[dict]:
    """Candidate keep-sets: top-k of θ, frequent recent hard masks, boundary swaps of θ, and the
    top-k of earlier θ (the KL initialisation and points along the search), so that the search
    can never end worse, on its own objective, than where it started."""

    def topk(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(sorted(torch.argsort(t, descending=True)[:k].tolist()))

    order = torch.argsort(theta, descending=True).tolist()
    top = topk(theta)
    cands = [{"source": "topk_theta", "keep": top}]
    for mask, count in Counter(recent_masks).most_common(3):
        cands.append({"source": f"frequent_mask x{count}", "keep": mask})
    kept_weakest = order[:k][::-1][:swaps]
    removed_strongest = order[k:][:swaps]
    for a in kept_weakest:
        for b in removed_strongest:
            cands.append({"source": f"swap {a}->{b}", "keep": tuple(sorted((set(top) - {a}) | {b}))})
    for name, t in earlier_thetas:
        cands.append({"source": f"topk_theta@{name}", "keep": topk(t)})
    unique, seen = [], set()
    for c in cands:
        if c["keep"] not in seen:
            seen.add(c["keep"])
            unique.append({"source": c["source"], "keep": list(c["keep"])})
    return unique


# --------------------------------------------------------------------------- the run


def held_back_sequences(n_sequences: int, final_sequences: int, final_selection: bool = True) -> int:
    """How many of the search split's sequences are held back for the final selection: the last
    ``final_sequences``, at most half the split (a small split still trains on most of it); none
    without a final selection."""
    return min(final_sequences, n_sequences // 2) if final_selection else 0


def split_search_data(
    data: dict[str, torch.Tensor], cfg: SearchConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The search split as (training part, held-back part): the first sequences and the last
    :func:`held_back_sequences`. The search's steps and its KL initialisation read only the first;
    the final candidates, and ``selection_method: best``, are judged only on the second."""
    n = data["input_ids"].size(0)
    held = held_back_sequences(n, cfg.final_sequences, cfg.final_selection)
    if cfg.final_selection and held < 1:
        raise E3PruneError(
            f"the search split has {n} sequence(s): too few to hold any back for the final selection; "
            "sample more search tokens or set final_selection to false",
            field="teacher_cache",
        )
    return {k: v[: n - held] for k, v in data.items()}, {k: v[n - held :] for k, v in data.items()}


@dataclass
class SearchRun:
    """What every part of one search shares: settings, frozen model, search split, plan, state store."""

    cfg: SearchConfig
    model: torch.nn.Module
    data: dict[str, torch.Tensor]  # the training part of the search split (never the held-back part)
    held_back: dict[str, torch.Tensor]  # the held-back part: the final selection's only data
    n_layers: int
    k: int
    total_steps: int
    tokens_per_step: int
    store: ResumableState
    input_device: torch.device = torch.device("cpu")  # where batches go: the model's embedding


@dataclass
class SearchState:
    """Everything the next step depends on; a checkpoint holds all of it."""

    step: int
    theta: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    order: torch.Tensor  # the seeded permutation of the search split that batches cycle through
    trajectory: list[dict]
    init_scores: list[float]
    init_theta: list[float]
    meter: Meter
    seconds_before: float  # spent before this process resumed (earlier runs, the initialisation)
    resumed_at: float = field(default_factory=time.time)

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.resumed_at

    def save(self, store: ResumableState) -> None:
        """Tensors to safetensors, the rest to JSON (``e3prune.resumable``); no pickle."""
        staging = store.staging_dir(self.step)
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a run killed mid-save
        staging.mkdir(parents=True)
        tree = {
            "step": self.step,
            "theta": self.theta.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "order": self.order,
            "trajectory": self.trajectory,
            "init_scores": self.init_scores,
            "init_theta": self.init_theta,
            "layer_tokens": self.meter.layer_tokens,
            "seconds": self.seconds(),
        }
        save_tree(tree, staging, SEARCH_STATE)
        store.publish(staging, self.step)

    @classmethod
    def load(cls, cfg: SearchConfig, checkpoint: Path) -> SearchState:
        tree = load_tree(checkpoint, SEARCH_STATE)
        theta = torch.nn.Parameter(tree["theta"].clone())
        optimizer = _optimizer(cfg, theta)
        optimizer.load_state_dict(tree["optimizer"])
        generator = torch.Generator()
        generator.set_state(tree["generator"])
        meter = Meter()
        meter.layer_tokens = tree["layer_tokens"]
        return cls(
            tree["step"], theta, optimizer, generator, tree["order"], tree["trajectory"],
            tree["init_scores"], tree["init_theta"], meter, tree["seconds"],
        )  # fmt: skip


OPTIMIZERS = {"shared_adam": SharedScaleAdam, "adam": torch.optim.Adam}


def _optimizer(cfg: SearchConfig, theta: torch.nn.Parameter) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer]([theta], lr=cfg.learning_rate)


def state_store(cfg: SearchConfig) -> ResumableState:
    """Where the resumable state goes: ``state``, default ``OUTPUT.state`` beside the output (local or S3)."""
    uri = cfg.state or str(cfg.output).rstrip("/") + ".state"
    return ResumableState(uri, resume_key(cfg, NOT_RESUME_RELEVANT), field="state")


def check_search_inputs(cfg: SearchConfig) -> tuple[int, int, TeacherTopK]:
    """Validation before any weights load: returns (L, n_remove, cache)."""
    check_device(cfg.device)
    config = load_config(cfg.model)
    L = config.num_hidden_layers
    n_remove = n_remove_for(cfg.remove_ratio, L)
    cache = TeacherTopK(cfg.teacher_cache)
    cache.check_teacher(cfg.model, config)  # the search scores the very model the cache was made with
    cache.check_positions(config)
    if cache.sequences("search") < 1:
        raise E3PruneError("the teacher cache's search split is empty", field="teacher_cache")
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != cache.manifest["tokenizer"]["fingerprint"]:
        raise E3PruneError("the teacher cache was made with another tokenizer than this model's", field="teacher_cache")
    if cache.manifest["vocab_size"] != config.vocab_size:
        raise E3PruneError(
            f"the cache's vocabulary ({cache.manifest['vocab_size']}) differs from the model's ({config.vocab_size})",
            field="teacher_cache",
        )
    storage.check_output(cfg.output, cfg.overwrite)
    return L, n_remove, cache


def _set_up(cfg: SearchConfig) -> SearchRun:
    """Check the inputs and the state location, split the search split (training, held back), load the frozen model."""
    L, n_remove, cache = check_search_inputs(cfg)
    store = state_store(cfg)
    store.check_writable()
    data, held_back = split_search_data(cache.load("search"), cfg)  # refuses a split too small, before any weights
    model, input_device = load_placed(cfg.model, cfg.device)  # fp32 on the CPU, bf16 on GPUs (frozen)
    model.requires_grad_(False)
    tokens_per_step = cfg.batch_size * data["input_ids"].size(1)
    total_steps = max(1, math.ceil(cfg.search_tokens / tokens_per_step))
    passes = cfg.search_tokens / data["input_ids"].numel()
    if passes > 1:
        log.warning(
            "the search reads %d tokens from the %d of its split's training part: each sequence %.1f times; "
            "sample a larger search split to see each once",
            cfg.search_tokens, data["input_ids"].numel(), passes,
        )  # fmt: skip
    return SearchRun(cfg, model, data, held_back, L, L - n_remove, total_steps, tokens_per_step, store, input_device)


def _initial_state(run: SearchRun, started: float) -> SearchState:
    """θ from the KL importance of Stage 2 (standardised × ``init_scale``) or zeros; a seeded data order."""
    cfg, meter, n_seq = run.cfg, Meter(), run.data["input_ids"].size(0)
    if cfg.init == "kl":
        calib = Calibration.from_batch(run.data, min(cfg.init_sequences, n_seq))
        init_scores = kl_importance(run.model, calib, cfg.batch_size, meter)
        scores = torch.tensor(init_scores)
        theta0 = (scores - scores.mean()) / scores.std().clamp_min(1e-12) * cfg.init_scale
    else:
        init_scores = [0.0] * run.n_layers
        theta0 = torch.tensor(init_scores)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_seq, generator=generator)
    theta = torch.nn.Parameter(theta0.float().clone())
    return SearchState(
        0, theta, _optimizer(cfg, theta), generator, order, [], init_scores, theta0.float().tolist(), meter,
        time.time() - started,
    )  # fmt: skip


def _resume_or_start(run: SearchRun, started: float) -> SearchState:
    """The newest checkpoint of this search if there is one (refused when of other settings), else a new state."""
    checkpoint = run.store.latest()
    if checkpoint is None:
        return _initial_state(run, started)
    run.store.read(checkpoint)
    state = SearchState.load(run.cfg, checkpoint)
    log.info("resuming the search at step %d of %d from %s", state.step, run.total_steps, run.store.uri)
    return state


def _search_step(run: SearchRun, state: SearchState, gates) -> dict:
    """One step: sample the mask, the loss against the teacher, one update of θ; returns its trajectory row."""
    cfg, step, L, data = run.cfg, state.step, run.n_layers, run.data
    n_seq = data["input_ids"].size(0)
    pos = (step * cfg.batch_size) % n_seq
    idx = state.order[torch.arange(pos, pos + cfg.batch_size) % n_seq]
    device = run.input_device
    x = data["input_ids"][idx].to(device)
    k_t = keep_count(step, run.total_steps, L, run.k, cfg.curriculum, cfg.curriculum_fraction)
    tau = temperature(step, run.total_steps, cfg.tau_start, cfg.tau_end)
    mask, hard = gumbel_topk_mask(state.theta, k_t, tau, sample_gumbel(L, state.generator))
    for l, g in enumerate(gates):
        g.gate, g.closed = mask[l], bool(hard[l] == 0)
    logits = run.model(input_ids=x, use_cache=False).logits.float()  # the loss in fp32 (bf16 weights on GPUs)
    loss = topk_kl(logits, data["values"][idx].to(device), data["ids"][idx].to(device), data["lse"][idx].to(device))
    loss = loss.mean()
    if cfg.ce_weight > 0:
        loss = loss + cfg.ce_weight * next_token_ce(logits, x).mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.meter.add(x.numel(), L + k_t)  # every layer forward; activation-only backward through the k_t kept
    keep = [l for l in range(L) if hard[l] > 0]
    theta = [round(v, 4) for v in state.theta.detach().tolist()]
    row = {"step": step, "loss": round(loss.item(), 5), "k": k_t, "tau": round(tau, 5), "keep": keep, "theta": theta}
    state.trajectory.append(row)
    state.step += 1
    return row


def _run_steps(run: SearchRun, state: SearchState) -> None:
    """Steps from the state's to the last, saving the state every ``checkpoint_every_steps`` and at the end."""
    bar = tqdm(total=run.total_steps, initial=state.step, desc="mask search", unit="step")
    with gated_layers(run.model) as gates:
        while state.step < run.total_steps:
            row = _search_step(run, state, gates)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", k=row["k"], tau=f"{row['tau']:.3f}")
            if state.step % run.cfg.checkpoint_every_steps == 0 or state.step == run.total_steps:
                state.save(run.store)
        for g in gates:
            g.gate, g.closed = 1.0, False
    bar.close()


def _choose(run: SearchRun, state: SearchState) -> tuple[list[int], list[dict]]:
    """The keep-set and the scored candidates it was chosen from (docs/method.md "Final selection")."""
    cfg, theta, trajectory = run.cfg, state.theta.detach(), state.trajectory
    if not cfg.final_selection:
        return sorted(torch.argsort(theta, descending=True)[: run.k].tolist()), []
    last = trajectory[-max(1, round(cfg.final_window_fraction * run.total_steps)) :]
    window = [tuple(t["keep"]) for t in last if t["k"] == run.k]
    calib = Calibration.from_batch(run.held_back)  # sequences no training step or the initialisation read
    earlier = [("init", torch.tensor(state.init_theta))] + [
        (f"step{trajectory[i]['step']}", torch.tensor(trajectory[i]["theta"]))
        for i in (len(trajectory) // 4, len(trajectory) // 2, 3 * len(trajectory) // 4)
    ]
    candidates = []
    for cand in final_candidates(theta, run.k, window, cfg.final_swaps, earlier):
        cand["kl"] = masked_loss(run.model, calib, cand["keep"], "kl", cfg.batch_size, state.meter)
        candidates.append(cand)
    return min(candidates, key=lambda c: c["kl"])["keep"], candidates


def _result(run: SearchRun, state: SearchState, keep: list[int], candidates: list[dict], seconds: float) -> dict:
    cfg, L, tokens = run.cfg, run.n_layers, run.total_steps * run.tokens_per_step
    return {
        "format_version": 1,
        "method": "e3_gumbel_topk",
        "model": cfg.model,
        "num_hidden_layers": L,
        "keep": keep,
        "removed": [l for l in range(L) if l not in set(keep)],
        "theta": state.theta.detach().tolist(),
        "init_scores": state.init_scores,
        "candidates": candidates,
        "held_back_sequences": run.held_back["input_ids"].size(0),
        "training_sequences": run.data["input_ids"].size(0),
        "chosen_from": next((c["source"] for c in candidates if c["keep"] == keep), "topk_theta"),
        "steps": run.total_steps,
        "search_tokens": tokens,
        "layer_tokens": state.meter.layer_tokens,
        "search_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "seconds": round(state.seconds(), 2),
        "config": cfg.model_dump(),
    }


def _write_output(cfg: SearchConfig, result: dict, trajectory: list[dict]) -> None:
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        (out / "search.json").write_text(json.dumps(result, indent=1) + "\n")
        with open(out / "trajectory.jsonl", "w") as fh:
            for row in trajectory:
                fh.write(json.dumps(row) + "\n")


def search_mask(cfg: SearchConfig) -> dict:
    """The step. Returns the result written to ``search.json`` (keep, removed, θ, candidates, cost)."""
    follow_cpu_quota()
    if cfg.selection_method != "e3":  # another selector, or the better of E³ and SLEB
        from e3prune.choose import choose_layers

        return choose_layers(cfg)
    started = time.time()
    run = _set_up(cfg)
    state = _resume_or_start(run, started)
    _run_steps(run, state)
    search_seconds = state.seconds()
    keep, candidates = _choose(run, state)
    result = _result(run, state, keep, candidates, search_seconds)
    _write_output(cfg, result, state.trajectory)
    run.store.remove()
    log.info("search: keep %s (removed %s) in %.1fs", keep, result["removed"], search_seconds)
    return result
