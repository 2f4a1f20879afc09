"""Layer selectors: which n of L decoder layers to remove. One interface for the E³ search's KL
initialisation (docs/method.md, Stage 2) and for every baseline the project keeps beside E³.

A selector takes the model, a calibration batch (token ids with the teacher's cached top-K)
and n, and returns a :class:`Selection`. Every criterion that needs a loss uses the masked view
(``e3prune.masking``); nothing is copied or retrained.

Cost is counted in *layer-tokens*: a forward of T tokens through k computed layers costs k·T;
an activation-only backward is counted like a forward. Wall time is recorded as well.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from e3prune.adapters import get_adapter
from e3prune.config import StepConfig
from e3prune.errors import E3PruneError
from e3prune.losses import next_token_ce, topk_kl
from e3prune.masking import gated_layers, masked_view
from e3prune.placement import DEVICE_HELP, Device, check_device, input_device, load_placed
from e3prune.reference import default_model
from e3prune.threads import follow_cpu_quota


@dataclass
class Calibration:
    """Token ids (N, S) and, when a teacher cache is used, its top-K for the same tokens."""

    input_ids: torch.Tensor
    values: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], sequences: int | None = None) -> Calibration:
        n = sequences or batch["input_ids"].size(0)
        return cls(batch["input_ids"][:n], batch["values"][:n], batch["ids"][:n], batch["lse"][:n])

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def head(self, n: int) -> Calibration:
        def cut(t):
            return None if t is None else t[:n]

        return Calibration(self.input_ids[:n], cut(self.values), cut(self.ids), cut(self.lse))


@dataclass
class Selection:
    method: str
    keep: list[int]
    removed: list[int]
    layer_tokens: int = 0
    seconds: float = 0.0
    scores: list[float] | None = None  # per-layer importance, higher = more important, when the method has one
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "keep": self.keep,
            "removed": self.removed,
            "layer_tokens": self.layer_tokens,
            "seconds": round(self.seconds, 3),
            "scores": self.scores,
            "details": self.details,
        }


class Meter:
    """Counts layer-tokens of masked forwards."""

    def __init__(self) -> None:
        self.layer_tokens = 0

    def add(self, tokens: int, layers: int) -> None:
        self.layer_tokens += tokens * layers


def _num_layers(model: nn.Module) -> int:
    return len(get_adapter(model).decoder_layers(model))


@torch.no_grad()
def masked_loss(
    model: nn.Module,
    calib: Calibration,
    keep: Sequence[int],
    criterion: str = "kl",
    batch_size: int = 8,
    meter: Meter | None = None,
) -> float:
    """Mean per-token loss of the masked view: ``kl`` to the cached teacher, or next-token ``ce``."""
    if criterion == "kl" and calib.values is None:
        raise E3PruneError("the KL criterion needs the teacher's cached top-K", field="criterion")
    total, count = 0.0, 0
    device = input_device(model)
    with masked_view(model, keep):
        for s in range(0, calib.input_ids.size(0), batch_size):
            x = calib.input_ids[s : s + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()  # fp32 losses (bf16 weights on GPUs)
            if criterion == "kl":
                per_tok = topk_kl(
                    logits,
                    calib.values[s : s + batch_size].to(device),
                    calib.ids[s : s + batch_size].to(device),
                    calib.lse[s : s + batch_size].to(device),
                )
            elif criterion == "ce":
                per_tok = next_token_ce(logits, x)
            else:
                raise E3PruneError(f"unknown criterion {criterion!r}; allowed: kl, ce", field="criterion")
            total += per_tok.sum().item()
            count += per_tok.numel()
            if meter is not None:
                meter.add(x.numel(), len(keep))
    return total / count


def _finish(
    method: str,
    n_layers: int,
    removed: Sequence[int],
    started: float,
    meter: Meter | None = None,
    scores: list[float] | None = None,
    **details,
) -> Selection:
    removed = sorted(removed)
    keep = [i for i in range(n_layers) if i not in set(removed)]
    return Selection(method, keep, removed, meter.layer_tokens if meter else 0, time.time() - started, scores, details)


def check_n_remove(n_remove: int, n_layers: int) -> None:
    if not 1 <= n_remove < n_layers:
        raise E3PruneError(
            f"must remove between 1 and {n_layers - 1} of {n_layers} layers, got {n_remove}", field="remove_ratio"
        )


def n_remove_for(ratio: float, n_layers: int) -> int:
    """n = round(ratio · L), with one error for a ratio outside (0, 1) or one that rounds to 0 or L."""
    if not 0 < ratio < 1:
        raise E3PruneError(f"must be strictly between 0 and 1, got {ratio}", field="remove_ratio")
    n = round(ratio * n_layers)
    if n == 0:
        raise E3PruneError(
            f"{ratio} of {n_layers} layers rounds to 0 layers; use at least {0.5 / n_layers:.3f}", field="remove_ratio"
        )
    if n >= n_layers:
        raise E3PruneError(f"{ratio} of {n_layers} layers removes every layer", field="remove_ratio")
    return n


# --- selectors -------------------------------------------------------------------------------------


def select_last(model: nn.Module, calib: Calibration, n_remove: int, **_) -> Selection:
    """The last n layers (the simplest depth-pruning baseline)."""
    L, t = _num_layers(model), time.time()
    return _finish("last", L, range(L - n_remove, L), t)


def select_random(model: nn.Module, calib: Calibration, n_remove: int, seed: int = 0, **_) -> Selection:
    """n layers drawn uniformly at random (seeded)."""
    L, t = _num_layers(model), time.time()
    return _finish("random", L, random.Random(seed).sample(range(L), n_remove), t, seed=seed)


@torch.no_grad()
def _layer_io(model: nn.Module, calib: Calibration, batch_size: int, meter: Meter):
    """Per calibration batch, the (input, output) hidden states of every layer, each (T, H) fp32.

    A generator, so callers reduce batch by batch and memory stays at one batch of activations."""
    L = _num_layers(model)
    device = input_device(model)
    with gated_layers(model) as gates:
        for s in range(0, calib.input_ids.size(0), batch_size):
            io: list[tuple[torch.Tensor, torch.Tensor]] = []

            def record(module, args, out):
                h_out = out[0] if isinstance(out, tuple) else out
                io.append((args[0].reshape(-1, args[0].size(-1)).float(), h_out.reshape(-1, h_out.size(-1)).float()))

            hooks = [g.register_forward_hook(record) for g in gates]
            try:
                x = calib.input_ids[s : s + batch_size].to(device)
                model(input_ids=x, use_cache=False)
                meter.add(x.numel(), L)
            finally:
                for h in hooks:
                    h.remove()
            yield io


def select_block_influence(model: nn.Module, calib: Calibration, n_remove: int, batch_size: int = 8, **_) -> Selection:
    """ShortGPT's Block Influence, BI_l = 1 − E_t[cos(h_in, h_out)]; the n lowest are removed."""
    L, t, meter = _num_layers(model), time.time(), Meter()
    cos_sum, count = torch.zeros(L, dtype=torch.float64), 0
    for io in _layer_io(model, calib, batch_size, meter):
        for l, (h_in, h_out) in enumerate(io):
            cos_sum[l] += torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).double().sum().cpu()
        count += io[0][0].size(0)
    bi = (1 - cos_sum / count).tolist()
    removed = sorted(range(L), key=lambda l: bi[l])[:n_remove]
    return _finish("block_influence", L, removed, t, meter, scores=bi)


def select_angular(model: nn.Module, calib: Calibration, n_remove: int, batch_size: int = 8, **_) -> Selection:
    """Gromov et al.: remove the contiguous block l..l+n−1 whose input and output are closest,
    d(h_l, h_{l+n}) = arccos(cos(h_l, h_{l+n})) / π, averaged over tokens."""
    L, t, meter = _num_layers(model), time.time(), Meter()
    starts = L - n_remove + 1
    dist_sum, count = torch.zeros(starts, dtype=torch.float64), 0
    for io in _layer_io(model, calib, batch_size, meter):
        hidden = [h_in for h_in, _ in io] + [io[-1][1]]  # hidden[l] = input of layer l; hidden[L] = last output
        for start in range(starts):
            h_end = hidden[start + n_remove].to(hidden[start].device)  # layers of a sharded model on other GPUs
            cos = torch.nn.functional.cosine_similarity(hidden[start], h_end, dim=-1).clamp(-1, 1)
            dist_sum[start] += (torch.arccos(cos) / math.pi).double().sum().cpu()
        count += hidden[0].size(0)
    dist = (dist_sum / count).tolist()
    best = min(range(starts), key=lambda s: dist[s])
    return _finish("angular", L, range(best, best + n_remove), t, meter, block_distance=dist)


def kl_importance(model: nn.Module, calib: Calibration, batch_size: int = 8, meter: Meter | None = None) -> list[float]:
    """Stage 2: KL(teacher ‖ model without layer l) for every l, on the calibration set."""
    L = _num_layers(model)
    return [masked_loss(model, calib, [i for i in range(L) if i != l], "kl", batch_size, meter) for l in range(L)]


def select_kl_oneshot(model: nn.Module, calib: Calibration, n_remove: int, batch_size: int = 8, **_) -> Selection:
    """One-shot KL ranking (Stage 2): the n layers whose single removal costs the least KL."""
    L, t, meter = _num_layers(model), time.time(), Meter()
    scores = kl_importance(model, calib, batch_size, meter)
    removed = sorted(range(L), key=lambda l: scores[l])[:n_remove]
    return _finish("kl_oneshot", L, removed, t, meter, scores=scores)


def select_sleb(
    model: nn.Module, calib: Calibration, n_remove: int, batch_size: int = 8, criterion: str = "ce", **_
) -> Selection:
    """SLEB-style greedy: n rounds, each removing the layer whose removal (with those already
    removed) gives the lowest calibration loss (perplexity, as in SLEB, by default)."""
    L, t, meter = _num_layers(model), time.time(), Meter()
    removed: list[int] = []
    rounds = []
    for _ in range(n_remove):
        losses = {}
        for cand in range(L):
            if cand in removed:
                continue
            gone = set(removed) | {cand}
            losses[cand] = masked_loss(
                model, calib, [i for i in range(L) if i not in gone], criterion, batch_size, meter
            )
        best = min(losses, key=losses.get)
        removed.append(best)
        rounds.append({"removed": best, "loss": losses[best]})
    return _finish("sleb", L, removed, t, meter, criterion=criterion, rounds=rounds)


def select_exhaustive(
    model: nn.Module,
    calib: Calibration,
    n_remove: int,
    batch_size: int = 8,
    criterion: str = "kl",
    max_combinations: int = 5000,
    **_,
) -> Selection:
    """Every C(L, n) removal set, scored on the calibration set; the best one."""
    L, t, meter = _num_layers(model), time.time(), Meter()
    total = math.comb(L, n_remove)
    if total > max_combinations:
        raise E3PruneError(
            f"C({L}, {n_remove}) = {total} combinations exceeds max_combinations = {max_combinations}",
            field="max_combinations",
        )
    scored = []
    for removed in itertools.combinations(range(L), n_remove):
        keep = [i for i in range(L) if i not in removed]
        scored.append((masked_loss(model, calib, keep, criterion, batch_size, meter), list(removed)))
    scored.sort()
    return _finish(
        "exhaustive",
        L,
        scored[0][1],
        t,
        meter,
        criterion=criterion,
        combinations=total,
        best_loss=scored[0][0],
        top5=[{"removed": r, "loss": l} for l, r in scored[:5]],
    )


SELECTORS: dict[str, Callable[..., Selection]] = {
    "last": select_last,
    "random": select_random,
    "block_influence": select_block_influence,
    "angular": select_angular,
    "sleb": select_sleb,
    "kl_oneshot": select_kl_oneshot,
    "exhaustive": select_exhaustive,
}


# --- the step -----------------------------------------------------------------------------------------


class SelectConfig(StepConfig):
    """What ``e3prune select`` takes: a baseline selector run as a step (the E³ search is ``search``)."""

    model: str = Field(default_factory=default_model, description="checkpoint whose layers are ranked")
    teacher_cache: str = Field(
        description="output of the teacher-logits step (its search split is the calibration set)"
    )
    output: str = Field(description="where to write selection.json")
    method: Literal["last", "random", "block_influence", "angular", "sleb", "kl_oneshot", "exhaustive"] = "sleb"
    remove_ratio: float = Field(0.25, description="fraction of decoder layers to remove, in (0, 1)")
    calibration_sequences: int = Field(16, ge=1, description="search-split sequences the selector may read")
    criterion: Literal["kl", "ce"] | None = Field(None, description="loss for sleb / exhaustive (default ce / kl)")
    batch_size: int = Field(8, ge=1)
    max_combinations: int = Field(5000, ge=1, description="refuse exhaustive search beyond this many removal sets")
    seed: int = 0
    device: Device = Field("auto", description=DEVICE_HELP)
    overwrite: bool = False


def select_layers(cfg: SelectConfig) -> Selection:
    """The step: validate, load, run the selector on the calibration set, write ``selection.json``."""
    follow_cpu_quota()
    from e3prune import storage
    from e3prune.model_io import load_config
    from e3prune.teacher import TeacherTopK

    check_device(cfg.device)
    config = load_config(cfg.model)
    L = config.num_hidden_layers
    n = n_remove_for(cfg.remove_ratio, L)
    if cfg.method == "exhaustive" and math.comb(L, n) > cfg.max_combinations:
        raise E3PruneError(
            f"C({L}, {n}) = {math.comb(L, n)} removal sets exceeds {cfg.max_combinations}", field="max_combinations"
        )
    cache = TeacherTopK(cfg.teacher_cache)
    cache.check_teacher(cfg.model, config)  # its calibration losses compare this model with its own cache
    cache.check_positions(config)
    storage.check_output(cfg.output, cfg.overwrite)
    model, _ = load_placed(cfg.model, cfg.device)  # fp32 on the CPU, bf16 on GPUs; batches go to its input device
    calib = Calibration.from_batch(cache.batch("search", 0, min(cfg.calibration_sequences, cache.sequences("search"))))
    opts = {"seed": cfg.seed, "batch_size": cfg.batch_size, "max_combinations": cfg.max_combinations}
    if cfg.criterion:
        opts["criterion"] = cfg.criterion
    sel = SELECTORS[cfg.method](model, calib, n, **opts)
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        (out / "selection.json").write_text(json.dumps({**sel.as_dict(), "config": cfg.model_dump()}, indent=1) + "\n")
    return sel
