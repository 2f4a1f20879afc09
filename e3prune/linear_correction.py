"""Linear correction of a removed run of layers (docs/method.md, "Linear correction (beyond the paper)").

After the keep-set is fixed, each maximal run of removed layers [i+1 .. i+n] is replaced by a linear
map T (d × d) of the MLP output of the kept layer i before it, as ReplaceMe does. With layer i's
output h_i = Y_i + M_i (Y_i: the residual stream after attention, M_i: the MLP output) and L the
hidden state after the run in the full model (what layer i+n+1 receives there),

    T* = argmin_T ‖M_i T + Y_i − L‖² + λ ‖T − I‖²  =  (MᵀM + λI)⁻¹ (Mᵀ(L − Y) + λI)

over the calibration tokens (rows). The ridge pulls T towards the identity (no correction), not
towards 0, so the fitted residual is never above the uncorrected one:
‖M T* − D‖² + λ‖T* − I‖² ≤ ‖M − D‖² (D = L − Y). λ = ``ridge`` · tr(MᵀM) / d.

Only the d × d statistics are kept, accumulated in float64 batch by batch: G = MᵀM, C = MᵀD,
Σ‖D‖² and Σ‖L‖², so the residual of any T is tr(TᵀGT) − 2 tr(TᵀC) + Σ‖D‖² without the tokens.

M T is folded into the weights that write M (the adapter's ``mlp_out_proj``): an ``nn.Linear``
computes a Wᵀ + b, so (a Wᵀ + b) T = a (Tᵀ W)ᵀ + (Tᵀ b): W ← Tᵀ W, b ← Tᵀ b; a stack of experts
(M = Σ_e g_e a_e W_eᵀ) takes W_e ← Tᵀ W_e for every e. The checkpoint keeps its architecture.

``inputs="pruned"`` (default): the runs are fitted in order, and Y_i, M_i come from the pruned model
with the corrections of the earlier runs in place (what layer i sees after hardening), while L
comes from the full model; ``"full"`` takes Y_i, M_i from the full model too (all runs in one pass).
A run at the very start has no kept layer before it and is left uncorrected (recorded as skipped).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from e3prune import storage
from e3prune.adapters import ArchitectureAdapter, get_adapter
from e3prune.errors import E3PruneError
from e3prune.masking import GatedLayer, masked_view, validate_keep
from e3prune.placement import input_device

Inputs = Literal["pruned", "full"]
SKIPPED_AT_START = "no kept layer precedes the run, so there is no MLP output projection to fold a map into"


def removed_runs(keep: Sequence[int], num_layers: int) -> list[tuple[int, ...]]:
    """Maximal runs of consecutive removed layer ids, in order."""
    keep_set = set(validate_keep(keep, num_layers))
    runs: list[list[int]] = []
    for i in range(num_layers):
        if i in keep_set:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [tuple(r) for r in runs]


class NormalEquations:
    """Float64 statistics of ‖M T − D‖² over streamed rows: G = MᵀM, C = MᵀD, Σ‖D‖², Σ‖L‖²."""

    def __init__(self, d: int, device: torch.device):
        self.G = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.C = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.dd = 0.0
        self.ll = 0.0
        self.tokens = 0

    def add(self, m: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> None:
        """One batch of rows (tokens × d): MLP output ``m``, residual ``y``, target ``target`` (= L)."""
        m, y, target = (t.reshape(-1, t.size(-1)).to(self.G.device, torch.float64) for t in (m, y, target))
        d = target - y
        self.G += m.T @ m
        self.C += m.T @ d
        self.dd += float((d * d).sum())
        self.ll += float((target * target).sum())
        self.tokens += m.size(0)

    def residual(self, T: torch.Tensor | None = None) -> float:
        """‖M T − D‖² summed over rows; T = None is the identity (no correction)."""
        if T is None:
            return float(self.G.trace() - 2 * self.C.trace() + self.dd)
        return float((T * (self.G @ T)).sum() - 2 * (T * self.C).sum() + self.dd)

    def relative_residual(self, T: torch.Tensor | None = None) -> float:
        """‖Y + M T − L‖ / ‖L‖ over all rows."""
        return math.sqrt(max(self.residual(T), 0.0) / self.ll) if self.ll > 0 else 0.0

    def solve(self, ridge: float) -> torch.Tensor:
        """T = (G + λI)⁻¹ (C + λI), λ = ridge · tr(G) / d (the ridge pulls T to the identity); G⁺ C at λ = 0."""
        d = self.G.size(0)
        eye = torch.eye(d, dtype=torch.float64, device=self.G.device)
        lam = ridge * float(self.G.trace()) / d
        if lam > 0:  # G + λI is positive definite
            return torch.linalg.solve(self.G + lam * eye, self.C + lam * eye)
        return torch.linalg.pinv(self.G, hermitian=True) @ self.C  # the minimum-norm solution when G is singular


@dataclass
class RunCorrection:
    """The fit of one removed run: its map ``T`` (None when skipped) and the residuals it was judged on."""

    removed: list[int]
    folded_into: int | None
    T: torch.Tensor | None = field(default=None, repr=False)
    tokens: int = 0
    relative_residual_before: float | None = None
    relative_residual_after: float | None = None
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "folded_into": self.folded_into,
            "tokens": self.tokens,
            "relative_residual_before": self.relative_residual_before,
            "relative_residual_after": self.relative_residual_after,
            "skipped": self.skipped,
        }


class _Stop(Exception):
    """Raised by a hook once everything a pass needs is captured: the rest of the forward is not run."""


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _mlp_maps(adapter: ArchitectureAdapter, layers: nn.ModuleList, maps: dict[int, torch.Tensor]) -> Iterator[None]:
    """Forward hooks that replace layer i's MLP output M by M T_i (the fold, before it is made)."""

    def hook(T: torch.Tensor):
        def apply(module, args, out):
            h = _hidden(out)
            mapped = (h.to(torch.float64) @ T.to(h.device)).to(h.dtype)
            return (mapped, *out[1:]) if isinstance(out, tuple) else mapped

        return apply

    handles = [layers[i].get_submodule(adapter.mlp_path).register_forward_hook(hook(T)) for i, T in maps.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _capture(
    model: nn.Module, input_ids: torch.Tensor, mlp_of: Sequence[int], output_of: Sequence[int]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward: the MLP output of each layer in ``mlp_of`` and the output of each layer in
    ``output_of`` (decoder-layer ids of the full numbering); the forward stops after the last one."""
    adapter = get_adapter(model)
    layers = [m.layer if isinstance(m, GatedLayer) else m for m in adapter.decoder_layers(model)]
    last = max([*mlp_of, *output_of])
    mlp_out: dict[int, torch.Tensor] = {}
    layer_out: dict[int, torch.Tensor] = {}
    handles = []

    def keep_mlp(i):
        def hook(module, args, out):
            mlp_out[i] = _hidden(out).detach()

        return hook

    def keep_output(i):
        def hook(module, args, out):
            layer_out[i] = _hidden(out).detach()
            if i == last:
                raise _Stop

        return hook

    for i in mlp_of:
        handles.append(layers[i].get_submodule(adapter.mlp_path).register_forward_hook(keep_mlp(i)))
    for i in sorted({*output_of, last}):
        handles.append(layers[i].register_forward_hook(keep_output(i)))
    try:
        model(input_ids=input_ids.to(input_device(model)), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if last not in layer_out:
        raise E3PruneError(f"layer {last} did not run; is it removed in this view?", field="linear_correction")
    return mlp_out, {i: layer_out[i] for i in output_of}


def fit_linear_correction(
    model: nn.Module,
    keep: Sequence[int],
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    ridge: float = 1e-4,
    inputs: Inputs = "pruned",
) -> list[RunCorrection]:
    """Fit one map per removed run on the calibration ``input_ids`` (sequences × seq_len); the model
    is not changed. See the module docstring for the objective."""
    adapter = get_adapter(model)
    L = model.config.num_hidden_layers
    keep = validate_keep(keep, L)
    if input_ids.numel() == 0:
        raise E3PruneError("the calibration set is empty", field="calibration_data")
    runs = removed_runs(keep, L)
    results = [
        RunCorrection(list(r), r[0] - 1 if r[0] > 0 else None, skipped=None if r[0] > 0 else SKIPPED_AT_START)
        for r in runs
    ]
    fitted = [r for r in results if r.skipped is None]
    for r in fitted:  # refuse a family without a foldable projection before any forward
        adapter.mlp_out_proj(adapter.decoder_layers(model)[r.folded_into])
    batches = [input_ids[s : s + batch_size] for s in range(0, input_ids.size(0), batch_size)]
    layers = adapter.decoder_layers(model)

    def new_stats(i: int) -> NormalEquations:
        w, _ = adapter.mlp_out_proj(layers[i])
        return NormalEquations(model.config.hidden_size, w.device)

    if inputs == "full":
        stats = {r.folded_into: new_stats(r.folded_into) for r in fitted}
        for ids in batches:
            anchors = [r.folded_into for r in fitted]
            targets = [r.removed[-1] for r in fitted]
            m, out = _capture(model, ids, anchors, [*anchors, *targets])
            for r in fitted:
                i = r.folded_into
                stats[i].add(m[i], out[i] - m[i], out[r.removed[-1]])
        for r in fitted:
            _finish(r, stats[r.folded_into], ridge)
        return results

    if inputs != "pruned":
        raise E3PruneError(f"inputs must be pruned or full, got {inputs!r}", field="linear_correction_inputs")
    maps: dict[int, torch.Tensor] = {}
    for r in fitted:
        i = r.folded_into
        # The pruned model up to layer i: earlier removed layers skipped, earlier maps applied.
        view_keep = [j for j in range(L) if j in set(keep) or j > i]
        st = new_stats(i)
        for ids in batches:
            _, target = _capture(model, ids, [], [r.removed[-1]])  # the full model, no maps
            with masked_view(model, view_keep), _mlp_maps(adapter, layers, maps):
                m, out = _capture(model, ids, [i], [i])
            st.add(m[i], out[i] - m[i], target[r.removed[-1]].to(m[i].device))
        _finish(r, st, ridge)
        maps[i] = r.T
    return results


def _finish(r: RunCorrection, st: NormalEquations, ridge: float) -> None:
    T = st.solve(ridge)
    r.tokens = st.tokens
    r.relative_residual_before = st.relative_residual(None)
    r.relative_residual_after = st.relative_residual(T)
    if not torch.isfinite(T).all() or st.residual(T) > st.residual(None):
        # Guaranteed not to happen in exact arithmetic (module docstring); in floating point, keep the layer as is.
        T = torch.eye(T.size(0), dtype=T.dtype, device=T.device)
        r.relative_residual_after = r.relative_residual_before
    r.T = T


@torch.no_grad()
def fold_into_mlp_out(adapter: ArchitectureAdapter, layer: nn.Module, T: torch.Tensor) -> None:
    """Make ``layer``'s MLP output M become M T: W ← Tᵀ W, b ← Tᵀ b (computed in float64)."""
    w, b = adapter.mlp_out_proj(layer)
    Tt = T.to(w.device, torch.float64).T
    w.copy_((Tt @ w.to(torch.float64)).to(w.dtype))  # (..., d, inner): broadcast over stacked experts
    if b is not None:
        b.copy_((Tt @ b.to(torch.float64)).to(b.dtype))


def apply_linear_correction(model: nn.Module, corrections: Sequence[RunCorrection]) -> None:
    """Fold every fitted map into the MLP output projection of the kept layer before its run (in place)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    for r in corrections:
        if r.T is not None and r.folded_into is not None:
            fold_into_mlp_out(adapter, layers[r.folded_into], r.T)


def calibration_input_ids(uri: str, tokens: int) -> torch.Tensor:
    """The first ⌈tokens / seq_len⌉ sequences of the *search* split (never eval) of sampled data or a
    teacher cache at ``uri``, int64 (sequences × seq_len)."""
    from e3prune.data import load_split
    from e3prune.teacher import TeacherTopK

    # The manifest alone (an s3:// teacher cache is streamed by TeacherTopK, never downloaded whole here).
    manifest = storage.read_manifest_only(
        uri, "manifest.json", "calibration_data", "give sampled data (`e3prune sample`) or a teacher cache"
    )
    is_cache = manifest.get("kind") == "teacher_cache" or "top_k" in manifest
    if is_cache:
        cache = TeacherTopK(uri)
        n = min(cache.sequences("search"), max(1, math.ceil(tokens / cache.seq_len)))
        return cache.batch("search", 0, n)["input_ids"].long()
    ids = load_split(uri, "search")
    n = max(1, math.ceil(tokens / ids.size(1)))
    return ids[:n]
