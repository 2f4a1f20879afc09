"""Gumbel-TopK mask search (docs/method.md, Stage 3).

Only the keep-logits θ ∈ ℝᴸ train; every model weight is frozen, so the backward pass computes
activation gradients only. Each step, with g ~ Gumbel(0, 1)ᴸ, z = θ + g and kₜ layers to keep:

    hard mask  m_h = 1[z_l among the top-kₜ of z]
    soft mask  m_s = σ((z − c) / τ),  c = midpoint of the kₜ-th and (kₜ+1)-th largest z
    mask       m   = m_h + m_s − stopgrad(m_s)        (straight-through: hard forward, soft backward)

and every layer is gated, h ← h + m_l · (F_l(h) − h) (``e3prune.masking``). The loss is the
per-token KL between the cached teacher top-K (+ tail) and the student, averaged over tokens,
plus λ·CE on the next token. The curriculum lowers kₜ linearly from L − 1 to k over the first
``curriculum_fraction`` of the steps; τ anneals exponentially from ``tau_start`` to ``tau_end``.
θ is initialised from the KL importance of Stage 2 (standardised, times ``init_scale``).

The final keep-set is chosen among a few candidates scored on the *search* split (docs/method.md
"Final selection"): the top-k of θ, the most frequent hard masks of the last steps, and single
swaps across the keep/remove boundary of θ.

State (θ, Adam, RNG, step, trajectory) is saved every ``checkpoint_every_steps`` so that a
killed search resumes and ends with the same mask as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from e3prune import storage
from e3prune.model_io import load_causal_lm, load_config, load_tokenizer
from e3prune.config import StepConfig
from e3prune.data import tokenizer_fingerprint
from e3prune.errors import E3PruneError
from e3prune.losses import next_token_ce, topk_kl
from e3prune.masking import gated_layers
from e3prune.reference import default_model
from e3prune.selection import Calibration, Meter, kl_importance, masked_loss, n_remove_for
from e3prune.teacher import TeacherTopK

log = logging.getLogger(__name__)


class SearchConfig(StepConfig):
    """What ``e3prune search`` takes. Defaults were chosen on the search split (benchmarks/selection.py)."""

    model: str = Field(default_factory=default_model, description="checkpoint whose layers are searched")
    teacher_cache: str = Field(description="output of the teacher-logits step (must include the search split)")
    output: str = Field(description="where to write search.json and trajectory.jsonl")
    remove_ratio: float = Field(0.25, description="fraction of decoder layers to remove, in (0, 1)")
    search_tokens: int = Field(614_400, ge=1, description="token budget of the search (steps × batch × seq_len)")
    batch_size: int = Field(8, ge=1, description="sequences per step")
    learning_rate: float = Field(0.05, gt=0, le=10)
    optimizer: Literal["shared_adam", "adam"] = Field(
        "shared_adam", description="shared_adam: one scale for all keep-logits (see SharedScaleAdam); adam: per-logit"
    )
    tau_start: float = Field(1.0, gt=0)
    tau_end: float = Field(0.05, gt=0)
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
    final_sequences: int = Field(32, ge=1, description="search-split sequences that score the final candidates")
    final_swaps: int = Field(3, ge=0, description="r: swaps between the r weakest kept and r strongest removed")
    final_window_fraction: float = Field(
        0.25, gt=0, le=1, description="last fraction of steps whose masks are candidates"
    )
    checkpoint_every_steps: int = Field(25, ge=1)
    state: str | None = Field(None, description="local directory for the resumable state (default: OUTPUT.state)")
    seed: int = 0
    overwrite: bool = False

    @model_validator(mode="after")
    def _tau(self) -> SearchConfig:
        if self.tau_end > self.tau_start:
            raise ValueError(f"tau_end ({self.tau_end}) must not exceed tau_start ({self.tau_start})")
        return self


def keep_count(step: int, total_steps: int, n_layers: int, k: int, curriculum: bool, fraction: float) -> int:
    """kₜ: linear from L − 1 down to k over the first ``fraction`` of the steps, then k."""
    if not curriculum or n_layers - 1 <= k:
        return k
    ramp = max(1, round(fraction * total_steps))
    progress = min(1.0, step / ramp)
    return max(k, round((n_layers - 1) - progress * ((n_layers - 1) - k)))


def temperature(step: int, total_steps: int, tau_start: float, tau_end: float) -> float:
    """τ annealed exponentially from ``tau_start`` to ``tau_end`` over the steps."""
    if total_steps <= 1:
        return tau_end
    return tau_start * (tau_end / tau_start) ** (step / (total_steps - 1))


def gumbel_topk_mask(
    theta: torch.Tensor, k: int, tau: float, gumbel: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straight-through mask m = m_h + m_s − stopgrad(m_s) and the hard mask m_h.

    ``gumbel`` is the noise g (None: no noise). The threshold c is the midpoint between the k-th
    and (k+1)-th largest z, treated as a constant of the step (no gradient through the sort).
    """
    z = theta if gumbel is None else theta + gumbel
    n = z.numel()
    order = torch.argsort(z.detach(), descending=True)
    hard = torch.zeros_like(z)
    hard[order[:k]] = 1.0
    if k < n:
        c = 0.5 * (z.detach()[order[k - 1]] + z.detach()[order[k]])
    else:
        c = z.detach()[order[-1]] - 1.0
    soft = torch.sigmoid((z - c) / tau)
    return hard + (soft - soft.detach()), hard  # (s − s) is exactly 0: the forward is exactly m_h


def sample_gumbel(n: int, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).float()


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam on the centred gradient with one second moment for the whole of θ [ours].

    Per-coordinate Adam moves every keep-logit by about lr a step whatever the size of its
    gradient. When most layers' gradients say "keep me", they all rise together and the ranking
    freezes, and a layer whose straight-through gradient is briefly wrong can sink past many
    others: on the reference model at 40 % it removed layer 0, the one whose removal costs the
    most (benchmarks/results/selection.md). Top-k and the soft mask do not change when a constant
    is added to θ, so the gradient's mean carries nothing and is removed; one scale for all layers
    keeps their relative sizes.

        g = ∇θ − mean(∇θ);  m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)·mean(g²)
        θ ← θ − lr · m̂ / (√v̂ + ε)
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad - p.grad.mean()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), dtype=p.dtype)
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_((g * g).mean(), alpha=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1**t)
                v_hat = state["exp_avg_sq"] / (1 - beta2**t)
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


def _state_dir(cfg: SearchConfig) -> Path:
    if cfg.state:
        return Path(cfg.state)
    if storage.is_s3(cfg.output):
        raise E3PruneError("an s3:// output needs a local `state` directory for the resumable state", field="state")
    return Path(str(cfg.output).rstrip("/") + ".state")


def _save_state(path: Path, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "search_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "search_state.pt")  # atomic: a kill mid-write leaves the previous state


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


def check_search_inputs(cfg: SearchConfig) -> tuple[int, int, TeacherTopK]:
    """Validation before any weights load: returns (L, n_remove, cache)."""
    config = load_config(cfg.model)
    L = config.num_hidden_layers
    n_remove = n_remove_for(cfg.remove_ratio, L)
    cache = TeacherTopK(cfg.teacher_cache)
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


def search_mask(cfg: SearchConfig) -> dict:
    """The step. Returns the result written to ``search.json`` (keep, removed, θ, candidates, cost)."""
    started = time.time()
    L, n_remove, cache = check_search_inputs(cfg)
    k = L - n_remove
    model = load_causal_lm(cfg.model, "float32")
    model.requires_grad_(False)
    device = next(model.parameters()).device
    data = cache.load("search")
    n_seq, seq_len = data["input_ids"].shape
    tokens_per_step = cfg.batch_size * seq_len
    total_steps = max(1, math.ceil(cfg.search_tokens / tokens_per_step))
    meter = Meter()
    state_dir = _state_dir(cfg)
    state_file = state_dir / "search_state.pt"

    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        if state["config"] != cfg.model_dump(exclude={"overwrite", "state"}):
            raise E3PruneError(
                f"{state_file} belongs to a search with other settings; remove it or change `state`", field="state"
            )
        log.info("resuming the search at step %d", state["step"])
    else:
        calib = Calibration.from_batch(data, min(cfg.init_sequences, n_seq))
        init_scores = kl_importance(model, calib, cfg.batch_size, meter) if cfg.init == "kl" else [0.0] * L
        scores = torch.tensor(init_scores)
        theta0 = (
            (scores - scores.mean()) / scores.std().clamp_min(1e-12) * cfg.init_scale if cfg.init == "kl" else scores
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        state = {
            "config": cfg.model_dump(exclude={"overwrite", "state"}),
            "step": 0,
            "theta": theta0.float(),
            "optimizer": None,
            "generator": gen.get_state(),
            "order": torch.randperm(n_seq, generator=gen),
            "trajectory": [],
            "init_scores": init_scores,
            "init_theta": theta0.float().tolist(),
            "layer_tokens": meter.layer_tokens,
            "seconds": time.time() - started,
        }

    theta = torch.nn.Parameter(state["theta"].clone())
    opt_cls = SharedScaleAdam if cfg.optimizer == "shared_adam" else torch.optim.Adam
    opt = opt_cls([theta], lr=cfg.learning_rate)
    if state["optimizer"] is not None:
        opt.load_state_dict(state["optimizer"])
    gen = torch.Generator()
    gen.set_state(state["generator"])
    order = state["order"]
    trajectory: list[dict] = state["trajectory"]
    meter.layer_tokens = state["layer_tokens"]
    run_started, seconds_before = time.time(), state["seconds"]

    bar = tqdm(total=total_steps, initial=state["step"], desc="mask search", unit="step")
    with gated_layers(model) as gates:
        step = state["step"]
        while step < total_steps:
            pos = (step * cfg.batch_size) % n_seq
            idx = order[torch.arange(pos, pos + cfg.batch_size) % n_seq]
            x = data["input_ids"][idx].to(device)
            k_t = keep_count(step, total_steps, L, k, cfg.curriculum, cfg.curriculum_fraction)
            tau = temperature(step, total_steps, cfg.tau_start, cfg.tau_end)
            mask, hard = gumbel_topk_mask(theta, k_t, tau, sample_gumbel(L, gen))
            for l, g in enumerate(gates):
                g.gate, g.closed = mask[l], bool(hard[l] == 0)
            logits = model(input_ids=x, use_cache=False).logits
            loss = topk_kl(
                logits, data["values"][idx].to(device), data["ids"][idx].to(device), data["lse"][idx].to(device)
            ).mean()
            if cfg.ce_weight > 0:
                loss = loss + cfg.ce_weight * next_token_ce(logits, x).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            meter.add(x.numel(), L + k_t)  # every layer forward; activation-only backward through the k_t kept
            trajectory.append(
                {
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "k": k_t,
                    "tau": round(tau, 5),
                    "keep": [l for l in range(L) if hard[l] > 0],
                    "theta": [round(v, 4) for v in theta.detach().tolist()],
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", k=k_t, tau=f"{tau:.3f}")
            step += 1
            if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
                _save_state(
                    state_dir,
                    {
                        **state,
                        "step": step,
                        "theta": theta.detach().clone(),
                        "optimizer": opt.state_dict(),
                        "generator": gen.get_state(),
                        "trajectory": trajectory,
                        "layer_tokens": meter.layer_tokens,
                        "seconds": seconds_before + time.time() - run_started,
                    },
                )
        for g in gates:
            g.gate, g.closed = 1.0, False
    bar.close()
    search_seconds = seconds_before + time.time() - run_started

    final_theta = theta.detach()
    candidates = []
    if cfg.final_selection:
        window = [
            tuple(t["keep"])
            for t in trajectory[-max(1, round(cfg.final_window_fraction * total_steps)) :]
            if t["k"] == k
        ]
        calib = Calibration.from_batch(data, min(cfg.final_sequences, n_seq))
        earlier = [("init", torch.tensor(state["init_theta"]))] + [
            (f"step{trajectory[i]['step']}", torch.tensor(trajectory[i]["theta"]))
            for i in (len(trajectory) // 4, len(trajectory) // 2, 3 * len(trajectory) // 4)
        ]
        for cand in final_candidates(final_theta, k, window, cfg.final_swaps, earlier):
            cand["kl"] = masked_loss(model, calib, cand["keep"], "kl", cfg.batch_size, meter)
            candidates.append(cand)
        best = min(candidates, key=lambda c: c["kl"])
        keep = best["keep"]
    else:
        keep = sorted(torch.argsort(final_theta, descending=True)[:k].tolist())
    removed = [l for l in range(L) if l not in set(keep)]
    result = {
        "format_version": 1,
        "method": "e3_gumbel_topk",
        "model": cfg.model,
        "num_hidden_layers": L,
        "keep": keep,
        "removed": removed,
        "theta": final_theta.tolist(),
        "init_scores": state["init_scores"],
        "candidates": candidates,
        "chosen_from": next((c["source"] for c in candidates if c["keep"] == keep), "topk_theta"),
        "steps": total_steps,
        "search_tokens": total_steps * tokens_per_step,
        "layer_tokens": meter.layer_tokens,
        "search_seconds": round(search_seconds, 2),
        "tokens_per_second": round(total_steps * tokens_per_step / max(search_seconds, 1e-9), 1),
        "seconds": round(seconds_before + time.time() - run_started, 2),
        "config": cfg.model_dump(),
    }
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        (out / "search.json").write_text(json.dumps(result, indent=1) + "\n")
        with open(out / "trajectory.jsonl", "w") as fh:
            for row in trajectory:
                fh.write(json.dumps(row) + "\n")
    if state_file.is_file():
        state_file.unlink()
        try:
            state_dir.rmdir()
        except OSError:
            pass
    log.info("search: keep %s (removed %s) in %.1fs", keep, removed, search_seconds)
    return result
