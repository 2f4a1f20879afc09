"""The masked model view: run a model with some decoder layers skipped, without copying weights.

Each decoder layer F_l is wrapped in a :class:`GatedLayer` computing (docs/method.md, Stage 3)

    h ← h + m_l · (F_l(h) − h)

so m_l = 1 is the layer, m_l = 0 is the identity (the layer is then not computed at all), and a
tensor m_l carries the straight-through gradient of the mask search. The search, the baselines
and hardening's verification all use this one view.

The view is meant for full-sequence forward passes (``use_cache=False``): a skipped layer never
writes its KV-cache slot, and caches read their length from layer 0. Generation through the
view therefore runs without a cache; the hardened model is the one that uses it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from e3prune.adapters import get_adapter
from e3prune.errors import E3PruneError


class GatedLayer(nn.Module):
    """A decoder layer with a gate: ``h + gate · (layer(h) − h)``; ``gate == 0`` skips the layer.

    ``closed`` marks a tensor gate whose forward value is exactly 0 (a hard-0 layer of the
    straight-through mask). Its layer is then run without building a graph: with m = 0,
    ∂out/∂F = m = 0, so no gradient would reach the layer anyway, while ∂out/∂m = F(h) − h and
    ∂out/∂h = 1 are unchanged. The backward through such layers is skipped exactly.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.gate: float | torch.Tensor = 1.0
        self.closed = False

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        gate = self.gate
        if isinstance(gate, (int, float)) and gate == 0:
            return hidden_states
        if self.closed and torch.is_tensor(gate):
            with torch.no_grad():
                out = self.layer(hidden_states, *args, **kwargs)
        else:
            out = self.layer(hidden_states, *args, **kwargs)
        if isinstance(gate, (int, float)) and gate == 1:
            return out
        h = out[0] if isinstance(out, tuple) else out
        mixed = (
            hidden_states + gate.to(h.dtype) * (h - hidden_states)
            if torch.is_tensor(gate)
            else (hidden_states + gate * (h - hidden_states))
        )
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Models read attributes such as ``attention_type`` off their layers; pass them through.
            return getattr(super().__getattr__("layer"), name)


def validate_keep(keep: Sequence[int], num_layers: int, field: str = "keep_layers") -> list[int]:
    """Sorted, validated keep-set: non-empty, in range, no duplicates, not every layer removed."""
    keep = list(keep)
    if not keep:
        raise E3PruneError(
            f"the keep-set is empty; keep between 1 and {num_layers} of the {num_layers} layers", field=field
        )
    bad = [i for i in keep if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise E3PruneError(f"layer ids {bad} are out of range; the model has layers 0..{num_layers - 1}", field=field)
    dupes = sorted({i for i in keep if keep.count(i) > 1})
    if dupes:
        raise E3PruneError(f"layer ids {dupes} are listed more than once", field=field)
    return sorted(keep)


def keep_from_removed(removed: Sequence[int], num_layers: int, field: str = "remove_layers") -> list[int]:
    """The keep-set from the ids to remove, with the same checks as :func:`validate_keep`."""
    removed = list(removed)
    if not removed:
        raise E3PruneError("no layers to remove; name at least one layer id", field=field)
    bad = [i for i in removed if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise E3PruneError(f"layer ids {bad} are out of range; the model has layers 0..{num_layers - 1}", field=field)
    dupes = sorted({i for i in removed if removed.count(i) > 1})
    if dupes:
        raise E3PruneError(f"layer ids {dupes} are listed more than once", field=field)
    if len(set(removed)) >= num_layers:
        raise E3PruneError(f"removing all {num_layers} layers leaves no model; keep at least one", field=field)
    return [i for i in range(num_layers) if i not in set(removed)]


@contextmanager
def gated_layers(model: nn.Module) -> Iterator[list[GatedLayer]]:
    """Wrap every decoder layer in a :class:`GatedLayer` (gates open); unwrap on exit."""
    layers = get_adapter(model).decoder_layers(model)
    originals = list(layers)
    if any(isinstance(m, GatedLayer) for m in originals):
        raise E3PruneError("this model's layers are already gated; nested masked views are not supported")
    gated = [GatedLayer(m) for m in originals]
    try:
        for i, g in enumerate(gated):
            layers[i] = g
        yield gated
    finally:
        for i, m in enumerate(originals):
            layers[i] = m


@contextmanager
def masked_view(model: nn.Module, keep: Sequence[int]) -> Iterator[nn.Module]:
    """The model with every layer not in ``keep`` skipped (identity), weights shared."""
    with gated_layers(model) as gates:
        keep_set = set(validate_keep(keep, len(gates)))
        for i, g in enumerate(gates):
            g.gate = 1.0 if i in keep_set else 0.0
        yield model
