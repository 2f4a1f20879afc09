"""Losses against the cached teacher top-K (docs/method.md, Stages 1, 3 and 5).

The cache holds, per token, the teacher's top-K logit values v (K), their vocabulary ids (K) and
the log-sum-exp of the full logits (lse). With lse the teacher's probabilities on its top-K are
exact, p_i = exp(v_i − lse), and the rest of the vocabulary is one *tail* bucket of mass
1 − Σ_i p_i. Student distributions are compared over the same K + 1 buckets: the student's
probabilities gathered at the teacher's ids, and its tail 1 − Σ_i q_i.

Shapes: B batch, S sequence, V vocabulary, K cached ids.
"""

from __future__ import annotations

import math

import torch

_TINY = 1e-12


def teacher_buckets(values: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Teacher probabilities over K + 1 buckets (top-K, then tail).

    values: (B, S, K) logits of the teacher's top-K (any float dtype); lse: (B, S) fp32.
    Returns (B, S, K + 1) fp32 that sums to 1 along the last dim.
    """
    p_top = torch.exp(values.float() - lse.float().unsqueeze(-1))  # (B, S, K)
    tail = (1.0 - p_top.sum(-1, keepdim=True)).clamp_min(0.0)  # (B, S, 1)
    return torch.cat([p_top, tail], dim=-1)


def student_log_buckets(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Student log-probabilities over the teacher's K ids and the tail: (B, S, K + 1) fp32.

    student_logits: (B, S, V); ids: (B, S, K) int.
    """
    logits = student_logits.float()
    # log q_i = z_i − logsumexp(z): gathers K values instead of normalising all V (same gradient).
    log_top = logits.gather(-1, ids.long()) - torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, S, K)
    # log(1 − Σ q_i), computed as log1p(−Σ q_i) with Σ q_i kept below 1 for stability.
    top_mass = torch.exp(torch.logsumexp(log_top, dim=-1, keepdim=True)).clamp_max(1.0 - 1e-7)
    log_tail = torch.log1p(-top_mass)
    return torch.cat([log_top, log_tail], dim=-1)


def topk_kl(student_logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher ‖ student) over the teacher's top-K plus the tail bucket: (B, S).

    KL_t = Σ_{i ∈ top-K ∪ {tail}} p_T,i · (log p_T,i − log q_S,i),   with 0 · log 0 = 0.
    """
    p = teacher_buckets(values, lse)
    log_p = torch.log(p.clamp_min(_TINY))
    log_q = student_log_buckets(student_logits, ids)
    return (p * (log_p - log_q)).sum(-1)


def teacher_entropy(values: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Normalised teacher entropy over the K + 1 buckets, h_t = H(p_T) / log(K + 1) ∈ [0, 1]: (B, S)."""
    p = teacher_buckets(values, lse)
    h = -(p * torch.log(p.clamp_min(_TINY))).sum(-1)
    return h / math.log(p.size(-1))


def next_token_ce(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy on the real next token: (B, S − 1)."""
    logits = student_logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1).long(), reduction="none"
    ).view(input_ids.size(0), -1)


def entropy_aware_kd_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    gamma: float,
    epsilon: float,
    ce_weight: float,
    *,
    weight_mean: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Entropy-aware top-K distillation loss (docs/method.md, Stage 5) and its parts for logging.

    Per token t, over the teacher's top-K ids plus the tail bucket:

        KL_t = Σ_i p_T,i · log(p_T,i / q_S,i)                    (:func:`topk_kl`, all S positions)
        h_t  = H(p_T) / log(K + 1) ∈ [0, 1]                       (:func:`teacher_entropy`)
        w_t  = (ε + h_t)^γ / mean_batch[(ε + h)^γ]                (mean 1; γ = 0 ⇒ w_t = 1, plain KD)
        CE_t = −log q_S(x_{t+1})                                   (positions 0..S−2, :func:`next_token_ce`)

        loss = Σ_t w_t · KL_t / T_KL  +  λ · Σ_t (1 − h_t) · CE_t / T_CE

    with T_KL = B·S and T_CE = B·(S − 1) the number of tokens in each sum. Uncertain "fork"
    tokens (high h_t) weigh more in the KD term; the CE term leans on tokens where the teacher is
    confident, so it does not push the student to be sure where the teacher is not.

    ``weight_mean`` is the mean of (ε + h)^γ over the whole optimizer-step batch (every
    micro-batch of every process); passing it makes the loss the same function of the global
    batch however that batch is split. Default: the mean over this batch.

    Shapes: student_logits (B, S, V); input_ids (B, S); values, ids (B, S, K); lse (B, S).
    Returns the scalar loss and ``{"kl", "ce", "entropy"}``: unweighted token means, as floats.
    """
    kl = topk_kl(student_logits, values, ids, lse)  # (B, S)
    h = teacher_entropy(values, lse)  # (B, S); teacher only, so no gradient flows through w or h
    raw = (epsilon + h) ** gamma
    mean = raw.mean() if weight_mean is None else torch.as_tensor(weight_mean, dtype=raw.dtype, device=raw.device)
    w = raw / mean.clamp_min(_TINY)
    loss = (w * kl).mean()
    if ce_weight:
        ce = next_token_ce(student_logits, input_ids)  # (B, S − 1)
        loss = loss + ce_weight * ((1.0 - h[:, :-1]) * ce).mean()
    else:
        with torch.no_grad():  # only for the log: λ = 0 must not pay for a second backward path
            ce = next_token_ce(student_logits, input_ids)
    stats = {"kl": kl.detach().mean().item(), "ce": ce.detach().mean().item(), "entropy": h.mean().item()}
    return loss, stats
