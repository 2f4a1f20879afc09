"""The top-K (+ tail) KL and entropy against hand-computed values."""

import math

import torch

from e3prune.losses import next_token_ce, student_log_buckets, teacher_buckets, teacher_entropy, topk_kl


def _cache_from_logits(logits: torch.Tensor, k: int):
    lse = torch.logsumexp(logits, -1)
    values, ids = torch.topk(logits, k, -1)
    return values, ids, lse


def test_teacher_buckets_by_hand():
    # vocabulary of 4, teacher logits log([0.5, 0.3, 0.15, 0.05]); K = 2 -> buckets [0.5, 0.3, tail 0.2]
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    values, ids, lse = _cache_from_logits(logits, 2)
    p = teacher_buckets(values, lse)
    assert torch.allclose(p, torch.tensor([[[0.5, 0.3, 0.2]]]), atol=1e-6)
    h = teacher_entropy(values, lse)
    want = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(3)
    assert abs(h.item() - want) < 1e-6


def test_topk_kl_by_hand_with_tail():
    teacher = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    student = torch.log(torch.tensor([[[0.25, 0.25, 0.25, 0.25]]]))
    values, ids, lse = _cache_from_logits(teacher, 2)
    kl = topk_kl(student, values, ids, lse)
    # teacher [0.5, 0.3, 0.2], student at the teacher's ids [0.25, 0.25], tail 0.5
    want = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert abs(kl.item() - want) < 1e-6
    logq = student_log_buckets(student, ids)
    assert torch.allclose(logq.exp(), torch.tensor([[[0.25, 0.25, 0.5]]]), atol=1e-6)


def test_kl_is_zero_for_the_teacher_itself_and_grows_with_k_to_full_kl():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 50), torch.randn(2, 5, 50)
    values, ids, lse = _cache_from_logits(t, 10)
    assert topk_kl(t, values, ids, lse).abs().max().item() < 1e-5
    # With K = V the tail is empty and the bucketed KL is the full KL.
    values, ids, lse = _cache_from_logits(t, 50)
    full = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    assert torch.allclose(topk_kl(s, values, ids, lse), full, atol=1e-4)
    # Bucketing can only lose information: KL over K+1 buckets <= full KL (data processing inequality).
    values, ids, lse = _cache_from_logits(t, 10)
    assert (topk_kl(s, values, ids, lse) <= full + 1e-5).all()


def test_bf16_cached_values_and_gradients_are_finite():
    torch.manual_seed(1)
    t = torch.randn(1, 4, 30) * 5
    s = torch.randn(1, 4, 30, requires_grad=True)
    values, ids, lse = _cache_from_logits(t, 10)
    kl = topk_kl(s, values.to(torch.bfloat16), ids.to(torch.int32), lse)
    kl.mean().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s.grad).all() and (kl >= -1e-3).all()


def test_next_token_ce_matches_cross_entropy():
    torch.manual_seed(2)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    ce = next_token_ce(logits, ids)
    assert ce.shape == (2, 5)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert abs(ce.mean().item() - want.item()) < 1e-6
