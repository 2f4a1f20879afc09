"""The entropy-aware top-K distillation loss (docs/method.md, Stage 5) against values computed by hand."""

import math

import pytest
import torch

from e3prune.distill import DistillConfig
from e3prune.distill_loss import PARTS, EntropyAwareKD, NextTokenCE, TopKKD, build_loss
from e3prune.losses import entropy_aware_kd_loss, next_token_ce, teacher_entropy, topk_kl

# One sequence of 2 tokens, vocabulary 4, teacher top-K = 2 (+ the tail bucket).
TEACHER_LOGITS = [[2.0, 1.0, 0.0, -1.0], [0.5, 0.0, 1.5, 0.2]]
STUDENT_LOGITS = [[1.0, 0.5, 0.2, 0.0], [0.0, 0.3, 1.0, -0.5]]
INPUT_IDS = [1, 2]  # position 0 predicts token 2
K = 2


def _softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def _by_hand(gamma, epsilon, ce_weight):
    """Every quantity of the loss, from plain floats: (loss, kl per token, h per token, weights, ce)."""
    kls, hs = [], []
    for t_logits, s_logits in zip(TEACHER_LOGITS, STUDENT_LOGITS):
        p_all, q_all = _softmax(t_logits), _softmax(s_logits)
        top = sorted(range(4), key=lambda i: -t_logits[i])[:K]
        p = [p_all[i] for i in top] + [1 - sum(p_all[i] for i in top)]  # top-K, then the tail
        q = [q_all[i] for i in top] + [1 - sum(q_all[i] for i in top)]
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        hs.append(-sum(pi * math.log(pi) for pi in p) / math.log(K + 1))
    raw = [(epsilon + h) ** gamma for h in hs]
    w = [r / (sum(raw) / len(raw)) for r in raw]
    ce = -math.log(_softmax(STUDENT_LOGITS[0])[INPUT_IDS[1]])  # the only next-token prediction
    loss = sum(wi * kl for wi, kl in zip(w, kls)) / 2 + ce_weight * (1 - hs[0]) * ce / 1
    return loss, kls, hs, w, ce


def _tensors():
    t = torch.tensor([TEACHER_LOGITS])
    values, ids = torch.topk(t, K, dim=-1)
    return (
        torch.tensor([STUDENT_LOGITS], requires_grad=True),
        torch.tensor([INPUT_IDS]),
        values,
        ids,
        torch.logsumexp(t, dim=-1),
    )


@pytest.mark.parametrize("gamma, epsilon, ce_weight", [(1.0, 0.1, 1.0), (2.0, 0.3, 0.5), (0.0, 0.1, 0.0)])
def test_matches_the_hand_computation(gamma, epsilon, ce_weight):
    want, kls, hs, w, ce = _by_hand(gamma, epsilon, ce_weight)
    assert sum(w) / len(w) == pytest.approx(1.0)
    assert hs[0] != pytest.approx(hs[1])  # the two tokens really get different weights when γ > 0
    logits, input_ids, values, ids, lse = _tensors()
    loss, stats = entropy_aware_kd_loss(logits, input_ids, values, ids, lse, gamma, epsilon, ce_weight)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["kl"] == pytest.approx(sum(kls) / 2, rel=1e-5)
    assert stats["entropy"] == pytest.approx(sum(hs) / 2, rel=1e-5)
    assert stats["ce"] == pytest.approx(ce, rel=1e-5)
    assert all(isinstance(v, float) for v in stats.values())


def _cfg(loss: str, **kw) -> DistillConfig:
    return DistillConfig(student="s", teacher_cache="c", output="o", loss=loss, **kw)


def _random_batch(seed=0, b=3, s=7, v=50, k=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, s, v, generator=g) * scale
    values, ids = torch.topk(teacher, k, dim=-1)
    student = (torch.randn(b, s, v, generator=g) * scale).requires_grad_(True)
    input_ids = torch.randint(0, v, (b, s), generator=g)
    return student, input_ids, values, ids, torch.logsumexp(teacher, dim=-1)


def test_gamma_zero_and_no_ce_is_plain_topk_kd():
    student, input_ids, values, ids, lse = _random_batch()
    loss, _ = entropy_aware_kd_loss(student, input_ids, values, ids, lse, gamma=0.0, epsilon=0.1, ce_weight=0.0)
    assert loss.item() == pytest.approx(topk_kl(student, values, ids, lse).mean().item(), rel=1e-6)
    batch = {"input_ids": input_ids, "values": values, "ids": ids, "lse": lse}
    kd_loss = build_loss(_cfg("kd", gamma=2.0, epsilon=0.3, ce_weight=5.0))  # "kd" ignores γ, λ
    assert isinstance(kd_loss, TopKKD) and kd_loss.weight_terms(batch) is None
    kd, _ = kd_loss(student, batch)
    assert kd.item() == pytest.approx(loss.item(), rel=1e-6)
    assert kd_loss.settings() == {"loss": "kd", "gamma": 0.0, "epsilon": None, "ce_weight": 0.0}


def test_ce_choice_is_plain_next_token_ce():
    student, input_ids, values, ids, lse = _random_batch(1)
    batch = {"input_ids": input_ids, "values": values, "ids": ids, "lse": lse}
    ce_loss = build_loss(_cfg("ce"))
    assert isinstance(ce_loss, NextTokenCE) and ce_loss.weight_terms(batch) is None
    assert ce_loss.settings() == {"loss": "ce", "gamma": None, "epsilon": None, "ce_weight": None}
    loss, stats = ce_loss(student, batch)
    assert loss.item() == pytest.approx(next_token_ce(student, input_ids).mean().item(), rel=1e-6)
    assert stats["kl"] == pytest.approx(topk_kl(student, values, ids, lse).mean().item(), rel=1e-6)


def test_weights_have_mean_one_and_split_batches_agree():
    """Loss = mean(w·KL) with w = (ε + h)^γ / mean((ε + h)^γ); with the global ``weight_mean``, the
    mean of the two halves' losses is the whole batch's loss (what makes 2 processes equal 1)."""
    student, input_ids, values, ids, lse = _random_batch(2, b=4)
    gamma, eps = 1.5, 0.1
    raw = (eps + teacher_entropy(values, lse)) ** gamma
    w = raw / raw.mean()
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6) and w.std().item() > 0.05
    loss, _ = entropy_aware_kd_loss(student, input_ids, values, ids, lse, gamma, eps, ce_weight=0.0)
    assert loss.item() == pytest.approx((w * topk_kl(student, values, ids, lse)).mean().item(), rel=1e-6)

    whole, _ = entropy_aware_kd_loss(student, input_ids, values, ids, lse, gamma, eps, ce_weight=1.0)
    halves = [
        entropy_aware_kd_loss(
            student[i], input_ids[i], values[i], ids[i], lse[i], gamma, eps, ce_weight=1.0, weight_mean=raw.mean()
        )[0]
        for i in (slice(0, 2), slice(2, 4))
    ]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-6)


def test_entropy_aware_loss_module_normalises_over_the_global_batch():
    """What the training loop does: sum the micro-batches' ``weight_terms`` (over processes too) and
    pass their mean back; the mean of the halves' losses is then the whole batch's loss."""
    student, input_ids, values, ids, lse = _random_batch(4, b=4)
    batch = {"input_ids": input_ids, "values": values, "ids": ids, "lse": lse}
    loss_fn = build_loss(_cfg("entropy_kd", gamma=1.5, epsilon=0.1, ce_weight=1.0))
    assert isinstance(loss_fn, EntropyAwareKD)
    assert loss_fn.settings() == {"loss": "entropy_kd", "gamma": 1.5, "epsilon": 0.1, "ce_weight": 1.0}
    halves = [(i, {k: v[i] for k, v in batch.items()}) for i in (slice(0, 2), slice(2, 4))]
    totals = sum(loss_fn.weight_terms(half) for _, half in halves)
    assert totals[1].item() == 4 * 7  # tokens of the whole batch
    whole, parts = loss_fn(student, batch)
    split = sum(loss_fn(student[i], half, totals[0] / totals[1])[0] for i, half in halves) / 2
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)
    assert set(parts) == set(PARTS) and all(isinstance(v, float) for v in parts.values())
    assert build_loss(_cfg("entropy_kd", gamma=0.0)).weight_terms(batch) is None  # (ε + h)^0 = 1


def test_gradients_are_finite_for_extreme_logits():
    # Peaked teacher (tail mass ~0) and a student sure of the wrong tokens: log(0) must not leak.
    student, input_ids, values, ids, lse = _random_batch(3, scale=60.0)
    loss, stats = entropy_aware_kd_loss(student, input_ids, values, ids, lse, gamma=1.0, epsilon=0.1, ce_weight=1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in stats.values())
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
