"""Architecture adapters: what differs between model families for layer pruning.

A family differs only in (docs/architecture.md, "Model families differ only in an adapter"):
- where the decoder layers are (``layers_path``);
- which config fields are per-layer lists (sliced with the keep-set, e.g. ``layer_types``);
- which config fields hold layer *indices* or counts (renumbered, e.g. ``mlp_only_layers``,
  ``max_window_layers``, ``decoder_sparse_step``);
- how attention's ``layer_idx`` is numbered: every family here numbers it 0..L-1 by position,
  which a fresh model built from the sliced config reproduces for the kept layers;
- which weights write a layer's MLP output into the residual stream (``mlp_out_paths``), where
  the linear correction (docs/method.md, "Linear correction") folds its map.

Adding a family is adding one entry to ``ADAPTERS`` and one case to the tests.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from e3prune.errors import E3PruneError


def _slice_max_window_layers(config: Any, keep: Sequence[int]) -> dict[str, Any]:
    """Qwen2/Qwen3: layers with index < max_window_layers use full attention; kept ones stay a prefix."""
    mwl = getattr(config, "max_window_layers", None)
    if mwl is None:
        return {}
    return {"max_window_layers": sum(1 for i in keep if i < mwl)}


def _qwen3_moe_sparse_layers(config: Any, keep: Sequence[int]) -> dict[str, Any]:
    """Qwen3-MoE: a layer is a sparse MoE block unless it is in ``mlp_only_layers`` or off the
    ``decoder_sparse_step`` grid (``(i + 1) % step != 0``). Both are index-based, so after
    renumbering the dense layers are listed explicitly and the step set to 1."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
    num_experts = getattr(config, "num_experts", 0) or 0

    def sparse(i: int) -> bool:
        return i not in mlp_only and num_experts > 0 and (i + 1) % step == 0

    out = _slice_max_window_layers(config, keep)
    out["mlp_only_layers"] = [new for new, old in enumerate(keep) if not sparse(old)]
    out["decoder_sparse_step"] = 1
    return out


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How to find and renumber the decoder layers of one model family."""

    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    per_layer_fields: tuple[str, ...] = ()
    index_fields: Callable[[Any, Sequence[int]], dict[str, Any]] | None = None
    notes: str = ""
    # Inside a decoder layer: the MLP, whose output M is added to the residual stream unchanged
    # (h = Y + M), and the weights that write M, tried in order (a Qwen3-MoE layer is sparse or
    # dense). ``mlp_out_paths = ()``: the family transforms M before the residual add (Gemma's
    # post-feedforward RMSNorm), so no linear map of M folds into a weight.
    mlp_path: str = "mlp"
    mlp_out_paths: tuple[str, ...] = ("mlp.down_proj",)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The ``nn.ModuleList`` of decoder layers, in order."""
        obj: Any = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, nn.ModuleList):
            raise E3PruneError(f"{type(model).__name__}.{self.layers_path} is not a ModuleList of decoder layers")
        return obj

    def mlp_out_proj(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight (``(..., hidden, inner)``: an ``nn.Linear``'s, or a stack of experts') and bias
        (``(hidden,)`` or None) that write ``layer``'s MLP output: M = Σ_e g_e · (a_e W_eᵀ + b), linear
        in them, so M ↦ M T is W ↦ Tᵀ W, b ↦ Tᵀ b."""
        if not self.mlp_out_paths:
            raise E3PruneError(
                f"{'/'.join(self.model_types)}: {self.notes or 'the MLP output is transformed before the residual add'}; "
                "no linear correction can be folded into its MLP output projection",
                field="linear_correction",
            )
        for path in self.mlp_out_paths:
            try:
                obj = layer.get_submodule(path)
            except AttributeError:
                try:  # a bare parameter (stacked experts) is not a submodule
                    module_name, _, leaf = path.rpartition(".")
                    obj = getattr(layer.get_submodule(module_name), leaf)
                except AttributeError:
                    continue
            if isinstance(obj, nn.Linear):
                return obj.weight, obj.bias
            if isinstance(obj, nn.Parameter):
                return obj, None
        raise E3PruneError(
            f"{type(layer).__name__} has none of {', '.join(self.mlp_out_paths)}; the adapter is wrong",
            field="linear_correction",
        )

    def layer_prefix(self, model: nn.Module) -> str:
        """State-dict key prefix of the layers, e.g. ``model.layers.`` for ``XForCausalLM``."""
        return self.layers_path + "."

    def sliced_config(self, config: Any, keep: Sequence[int]) -> Any:
        """A deep copy of ``config`` describing a model of only the ``keep`` layers, in order."""
        n = config.num_hidden_layers
        new = copy.deepcopy(config)
        updates: dict[str, Any] = {"num_hidden_layers": len(keep)}
        for name in self.per_layer_fields:
            value = getattr(config, name, None)
            if value is None:
                continue
            if len(value) != n:
                raise E3PruneError(
                    f"config.{name} has {len(value)} entries but the model has {n} layers; the checkpoint is inconsistent"
                )
            updates[name] = [value[i] for i in keep]
        if self.index_fields is not None:
            updates.update(self.index_fields(config, keep))
        for key, value in updates.items():
            setattr(new, key, value)
        return new


_SLIDING = ("layer_types",)
_GEMMA_POST_NORM = "the MLP output passes an RMSNorm (post_feedforward_layernorm) before the residual add"

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(("llama",), per_layer_fields=_SLIDING),
    ArchitectureAdapter(("mistral",), per_layer_fields=_SLIDING, notes="sliding_window is global"),
    ArchitectureAdapter(("qwen2",), per_layer_fields=_SLIDING, index_fields=_slice_max_window_layers),
    ArchitectureAdapter(("qwen3",), per_layer_fields=_SLIDING, index_fields=_slice_max_window_layers),
    ArchitectureAdapter(
        ("qwen3_moe",),
        per_layer_fields=_SLIDING,
        index_fields=_qwen3_moe_sparse_layers,
        mlp_out_paths=("mlp.experts.down_proj", "mlp.down_proj"),  # sparse (stacked experts), dense
    ),
    ArchitectureAdapter(("gemma2",), per_layer_fields=_SLIDING, mlp_out_paths=(), notes=_GEMMA_POST_NORM),
    ArchitectureAdapter(("gemma3_text",), per_layer_fields=_SLIDING, mlp_out_paths=(), notes=_GEMMA_POST_NORM),
    ArchitectureAdapter(("phi3",), per_layer_fields=_SLIDING),
)
_BY_TYPE = {t: a for a in ADAPTERS for t in a.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_TYPE))


def get_adapter(config_or_model: Any) -> ArchitectureAdapter:
    """The adapter for a config or model, or an error listing the supported architectures."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    adapter = _BY_TYPE.get(model_type)
    if adapter is None:
        arch = ", ".join(getattr(config, "architectures", None) or []) or model_type
        raise E3PruneError(
            f"unsupported architecture {arch!r} (model_type {model_type!r}); supported model types: "
            + ", ".join(SUPPORTED_MODEL_TYPES),
            field="model",
        )
    return adapter
