"""The Gumbel-TopK sampler's math (docs/method.md, Stage 3), against hand-computed values."""

import math

import pytest
import torch

from e3prune.gumbel_topk import gumbel_topk_mask, keep_count, sample_gumbel, temperature


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_hard_mask_has_exactly_k_ones(k):
    gen = torch.Generator().manual_seed(k)
    theta = torch.randn(8)
    for _ in range(20):
        mask, hard = gumbel_topk_mask(theta, k, 0.5, sample_gumbel(8, gen))
        assert hard.sum().item() == k and set(hard.unique().tolist()) <= {0.0, 1.0}
        # Straight-through: the forward value is exactly the hard mask.
        assert torch.equal(mask.detach(), hard)


def test_straight_through_gradient_equals_relaxation_gradient():
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    g = sample_gumbel(6, torch.Generator().manual_seed(1))
    weights = torch.randn(6)  # any downstream linear use of the mask
    tau, k = 0.7, 4

    mask, _ = gumbel_topk_mask(theta, k, tau, g)
    (mask * weights).sum().backward()
    st_grad = theta.grad.clone()

    # The relaxation alone, with the same (constant) threshold c.
    z = (theta + g).detach()
    zs = torch.sort(z, descending=True).values
    c = 0.5 * (zs[k - 1] + zs[k])
    theta.grad = None
    soft = torch.sigmoid((theta + g - c) / tau)
    (soft * weights).sum().backward()
    assert torch.allclose(st_grad, theta.grad, atol=1e-7)
    # and by hand: d σ((θ+g−c)/τ)/dθ = σ'(·)/τ
    s = torch.sigmoid((z - c) / tau)
    assert torch.allclose(st_grad, weights * s * (1 - s) / tau, atol=1e-6)


def test_zero_temperature_without_noise_is_topk_of_theta():
    theta = torch.tensor([0.3, -1.0, 2.0, 0.1, 1.5, -0.2])
    for k in range(1, 6):
        mask, hard = gumbel_topk_mask(theta, k, 1e-6, None)
        want = torch.zeros(6)
        want[torch.topk(theta, k).indices] = 1
        assert torch.equal(hard, want)
        soft = torch.sigmoid(
            (
                theta
                - 0.5
                * (torch.sort(theta, descending=True).values[k - 1] + torch.sort(theta, descending=True).values[k])
            )
            / 1e-6
        )
        assert torch.equal(soft.round(), want)


def test_curriculum_and_temperature_schedules():
    # L = 24, k = 18, 100 steps, ramp over the first half: 23 -> 18 linearly, then 18.
    ks = [keep_count(s, 100, 24, 18, True, 0.5) for s in range(100)]
    assert ks[0] == 23 and ks[50] == 18 and ks[-1] == 18 and ks[25] in (20, 21)
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert keep_count(0, 100, 24, 18, False, 0.5) == 18
    assert temperature(0, 100, 1.0, 0.05) == pytest.approx(1.0)
    assert temperature(99, 100, 1.0, 0.05) == pytest.approx(0.05)
    assert temperature(33, 100, 1.0, 0.05) == pytest.approx(0.05 ** (33 / 99))
    assert math.isfinite(temperature(0, 1, 1.0, 0.05))


def test_gumbel_noise_is_standard_gumbel():
    g = sample_gumbel(200_000, torch.Generator().manual_seed(0))
    assert abs(g.mean().item() - 0.5772) < 0.01  # Euler–Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


def test_shared_scale_adam_keeps_relative_sizes_and_ignores_the_mean():
    from e3prune.gumbel_topk import SharedScaleAdam

    def run(grad: torch.Tensor) -> torch.Tensor:
        theta = torch.nn.Parameter(torch.zeros(4))
        opt = SharedScaleAdam([theta], lr=0.1)
        for _ in range(3):
            theta.grad = grad.clone()
            opt.step()
        return theta.detach()

    g = torch.tensor([4.0, 1.0, -1.0, -4.0])
    moved = run(g)
    # one scale for all: the step is proportional to the centred gradient, not its sign
    assert torch.allclose(moved / moved[0], torch.tensor([1.0, 0.25, -0.25, -1.0]), atol=1e-6)
    # adding a constant to every gradient (it would shift every θ alike) changes nothing
    assert torch.allclose(run(g + 7.0), moved, atol=1e-6)
    # per-coordinate Adam, by contrast, moves every coordinate by about lr whatever its size
    theta = torch.nn.Parameter(torch.zeros(4))
    adam = torch.optim.Adam([theta], lr=0.1)
    theta.grad = g.clone()
    adam.step()
    assert torch.allclose(theta.detach().abs(), torch.full((4,), 0.1), atol=1e-6)
