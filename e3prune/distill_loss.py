"""The distillation loss (docs/method.md, Stage 5) as one object built from the settings.

:func:`build_loss` turns ``DistillConfig.loss`` (with γ, ε, λ) into a :class:`DistillLoss` once;
the training loop then only calls it, ``loss, parts = loss_fn(student_logits, batch, weight_mean)``,
and records ``loss_fn.settings()``. The equations are in ``e3prune.losses``:

- ``entropy_kd`` (:class:`EntropyAwareKD`): Σ_t w_t · KL_t / T + λ · Σ_t (1 − h_t) · CE_t / T,
  w_t = (ε + h_t)^γ / mean(w), :func:`e3prune.losses.entropy_aware_kd_loss`.
- ``kd`` (:class:`TopKKD`): the same with γ = 0 and λ = 0, plain top-K KD.
- ``ce`` (:class:`NextTokenCE`): plain fine-tuning on the next token.

``batch`` holds ``input_ids`` (B, S), ``values``/``ids`` (B, S, K) and ``lse`` (B, S).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from e3prune.losses import entropy_aware_kd_loss, next_token_ce, teacher_entropy, topk_kl

# What every loss reports besides itself: unweighted token means of the top-K KL, the next-token
# CE and the teacher's normalised entropy, whatever it trains on.
PARTS = ("kl", "ce", "entropy")


class DistillLoss(torch.nn.Module, ABC):
    """A distillation loss: ``forward(student_logits, batch, weight_mean=None) -> (loss, parts)``,
    ``parts`` the floats of :data:`PARTS` for the log."""

    name = ""

    def weight_terms(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``[Σ raw token weights, tokens]`` of ``batch`` when the loss weighs tokens and normalises the
        weights over the whole optimizer-step batch (summed over micro-batches and processes and
        passed back as ``weight_mean``); None when every token weighs the same."""
        return None

    @abstractmethod
    def forward(
        self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], weight_mean: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss on one micro-batch and its :data:`PARTS`."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The loss as applied: name, γ, ε, λ (None where the loss has none), for the record."""


class EntropyAwareKD(DistillLoss):
    """E³'s entropy-aware top-K KD with the next-token CE term (``entropy_kd``)."""

    name = "entropy_kd"

    def __init__(self, gamma: float, epsilon: float, ce_weight: float):
        super().__init__()
        self.gamma, self.epsilon, self.ce_weight = gamma, epsilon, ce_weight

    def weight_terms(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.gamma == 0:  # (ε + h)^0 = 1: nothing to normalise
            return None
        raw = (self.epsilon + teacher_entropy(batch["values"], batch["lse"])) ** self.gamma
        return torch.stack([raw.sum(), torch.tensor(float(raw.numel()))])

    def forward(
        self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], weight_mean: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        b = batch
        return entropy_aware_kd_loss(
            student_logits, b["input_ids"], b["values"], b["ids"], b["lse"],
            self.gamma, self.epsilon, self.ce_weight, weight_mean=weight_mean,
        )  # fmt: skip

    def settings(self) -> dict[str, Any]:
        return {"loss": self.name, "gamma": self.gamma, "epsilon": self.epsilon, "ce_weight": self.ce_weight}


class TopKKD(EntropyAwareKD):
    """Plain top-K KD (``kd``): every token weighs 1 (γ = 0, so ε plays no part) and no CE term (λ = 0)."""

    name = "kd"

    def __init__(self):
        super().__init__(gamma=0.0, epsilon=1.0, ce_weight=0.0)

    def settings(self) -> dict[str, Any]:
        return {"loss": self.name, "gamma": 0.0, "epsilon": None, "ce_weight": 0.0}


class NextTokenCE(DistillLoss):
    """Plain next-token cross-entropy (``ce``); the KL to the teacher is still measured, for the log."""

    name = "ce"

    def forward(
        self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], weight_mean: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = next_token_ce(student_logits, batch["input_ids"]).mean()
        with torch.no_grad():  # agreement with the teacher is still worth watching
            kl = topk_kl(student_logits, batch["values"], batch["ids"], batch["lse"]).mean().item()
            h = teacher_entropy(batch["values"], batch["lse"]).mean().item()
        return loss, {"kl": kl, "ce": loss.item(), "entropy": h}

    def settings(self) -> dict[str, Any]:
        return {"loss": self.name, "gamma": None, "epsilon": None, "ce_weight": None}


# DistillConfig.loss -> the loss built from the config (any object with loss, gamma, epsilon, ce_weight).
LOSSES: dict[str, Callable[[Any], DistillLoss]] = {
    "entropy_kd": lambda cfg: EntropyAwareKD(cfg.gamma, cfg.epsilon, cfg.ce_weight),
    "kd": lambda cfg: TopKKD(),
    "ce": lambda cfg: NextTokenCE(),
}


def build_loss(cfg: Any) -> DistillLoss:
    """The loss ``cfg.loss`` names, with ``cfg``'s γ, ε, λ where it uses them."""
    return LOSSES[cfg.loss](cfg)
