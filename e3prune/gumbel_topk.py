"""The Gumbel-TopK sampler of the mask search (docs/method.md, Stage 3): its schedules, the
straight-through mask and the optimiser of the keep-logits θ ∈ ℝᴸ.

Each step, with g ~ Gumbel(0, 1)ᴸ, z = θ + g and kₜ layers to keep:

    hard mask  m_h = 1[z_l among the top-kₜ of z]
    soft mask  m_s = σ((z − c) / τ),  c = midpoint of the kₜ-th and (kₜ+1)-th largest z
    mask       m   = m_h + m_s − stopgrad(m_s)        (straight-through: hard forward, soft backward)

The curriculum lowers kₜ linearly from L − 1 to k over the first ``curriculum_fraction`` of the
steps; τ anneals exponentially from ``tau_start`` to ``tau_end``. ``e3prune.search`` runs the steps.
"""

from __future__ import annotations

import torch


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
