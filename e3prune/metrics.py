"""Held-out quality of models against a teacher (docs/method.md, Stage 6): the per-position math
and the one pass over the eval split that sums it.

- Perplexity is exp(Σ CE / N) over all N = sequences × (seq_len − 1) next-token positions
  (token-weighted, so every position counts once whatever the batching).
- Top-1 agreement and KL(teacher ‖ model) are over all sequences × seq_len positions (a
  distribution exists at every position, the last included), the KL over the *full* vocabulary
  from both models' logits batch by batch (not the top-K cache of Stage 1, which sees only K
  ids and a tail).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from e3prune.losses import next_token_ce


def full_vocab_kl(teacher_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher ‖ model) over the whole vocabulary: (B, S) fp32.

    KL_t = Σ_v p_T(v) · (log p_T(v) − log p_S(v)), both from log-softmax in fp32, with 0 · log 0 = 0:
    a vocabulary entry the teacher masks to −inf (padding rows, say) would otherwise give
    0 · (−inf) = NaN.
    """
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = torch.log_softmax(model_logits.float(), dim=-1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p.isneginf(), torch.zeros_like(terms), terms).sum(-1)


def top1_agreement(teacher_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-position 1.0 where both models' argmax token is the same, else 0.0: (B, S)."""
    return (teacher_logits.argmax(-1) == model_logits.argmax(-1)).float()


def gap_closed(ppl_teacher: float, ppl_pruned: float | None, ppl_model: float) -> float | None:
    """(ppl_pruned − ppl_model) / (ppl_pruned − ppl_teacher): the share of the pruning's
    perplexity loss that ``model`` recovers. None without a pruned model or when pruning lost
    nothing (the share of a zero gap means nothing)."""
    if ppl_pruned is None or ppl_pruned == ppl_teacher:
        return None
    return (ppl_pruned - ppl_model) / (ppl_pruned - ppl_teacher)


@dataclass(frozen=True)
class HeldOut:
    """Sums over the eval split, per role; the metrics are ratios of these."""

    ce_sum: dict[str, float]  # Σ next-token CE, nats
    scored: int  # next-token positions: sequences × (seq_len − 1)
    agree_sum: dict[str, float]  # Σ top-1 agreement, compared roles only
    kl_sum: dict[str, float]  # Σ KL(teacher ‖ model), compared roles only
    positions: int  # positions compared: sequences × seq_len


def heldout_sums(models: Mapping[str, torch.nn.Module], ids: torch.Tensor, batch_size: int) -> HeldOut:
    """One pass over ``ids`` (N, S): the teacher's logits once a batch, each other model's against them.

    ``models`` holds ``teacher`` and the models compared with it (any roles, possibly the same
    object as the teacher).
    """
    device = next(models["teacher"].parameters()).device
    others = [r for r in models if r != "teacher"]
    ce = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(others, 0.0)
    kl = dict.fromkeys(others, 0.0)
    bar = tqdm(total=ids.size(0), desc="held-out perplexity and agreement", unit="seq")
    with torch.no_grad():
        for start in range(0, ids.size(0), batch_size):
            batch = ids[start : start + batch_size].to(device)
            t_logits = models["teacher"](input_ids=batch, use_cache=False).logits.float()
            ce["teacher"] += next_token_ce(t_logits, batch).double().sum().item()
            for role in others:
                logits = models[role](input_ids=batch, use_cache=False).logits.float()
                ce[role] += next_token_ce(logits, batch).double().sum().item()
                agree[role] += top1_agreement(t_logits, logits).double().sum().item()
                kl[role] += full_vocab_kl(t_logits, logits).double().sum().item()
                del logits
            bar.update(batch.size(0))
    bar.close()
    n, s = ids.shape
    return HeldOut(ce, n * (s - 1), agree, kl, n * s)
