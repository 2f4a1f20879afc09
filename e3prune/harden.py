"""Hardening (docs/method.md, Stage 4): a keep-set becomes a real, shallower checkpoint.

A *fresh* model of the same class is built from a config with ``num_hidden_layers = k`` and
every per-layer field sliced (the adapter's job), so attention's ``layer_idx`` is 0..k-1 and the
KV cache lines up. The kept layers' tensors are then placed under their new indices; tied
weights stay one tensor. The result is checked on a probe batch against the masked view of the
source (same logits, same greedy tokens — the hardened model with its KV cache, the view
without) before anything is written.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from e3prune import __version__, storage
from e3prune.adapters import get_adapter
from e3prune.config import StepConfig
from e3prune.errors import E3PruneError
from e3prune.masking import keep_from_removed, masked_view, validate_keep
from e3prune.model_io import DTYPES, load_config, load_tokenizer
from e3prune.placement import Device, check_device, dispatch_kept_layers, input_device, load_placed, undispatch
from e3prune.threads import follow_cpu_quota

log = logging.getLogger(__name__)
PRUNING_FILE = "pruning.json"


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    return chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = value  # already an nn.Parameter (see harden)
    else:
        module._buffers[leaf] = value


def harden(model: nn.Module, keep: Sequence[int], *, share_weights: bool = False) -> nn.Module:
    """A new model of ``type(model)`` holding only the ``keep`` layers, renumbered 0..k-1.

    ``share_weights=True`` places the source's tensors in the new model without copying (the
    source must then not be trained further); by default the kept tensors are cloned.
    """
    adapter = get_adapter(model)
    keep = validate_keep(keep, model.config.num_hidden_layers)
    new_config = adapter.sliced_config(model.config, keep)
    with torch.device("meta"):
        new_model = type(model)(new_config)

    # Source name -> tensor, with the layer index rewritten old -> new; layers not kept dropped.
    prefix = re.escape(adapter.layers_path) + r"\.(\d+)\."
    old_to_new = {old: new for new, old in enumerate(keep)}
    placed: dict[int, torch.Tensor] = {}  # id(source tensor) -> new tensor: tied weights stay tied
    tensors: dict[str, torch.Tensor] = {}
    for name, t in _named_tensors(model):
        m = re.match(prefix, name)
        if m:
            old = int(m.group(1))
            if old not in old_to_new:
                continue
            name = f"{adapter.layers_path}.{old_to_new[old]}.{name[m.end() :]}"
        if id(t) not in placed:
            data = t.detach() if share_weights else t.detach().clone()
            placed[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
        tensors[name] = placed[id(t)]

    for name, _ in list(_named_tensors(new_model)):
        if name not in tensors:
            raise E3PruneError(f"hardening {type(model).__name__}: no source tensor for {name}; the adapter is wrong")
        _set_tensor(new_model, name, tensors[name])
    still_meta = [n for n, t in _named_tensors(new_model) if t.is_meta]
    if still_meta:
        raise E3PruneError(f"hardening left tensors unset: {still_meta[:5]}")
    if getattr(new_config, "tie_word_embeddings", False):
        new_model.tie_weights()
    new_model.generation_config = copy.deepcopy(model.generation_config)
    new_model.train(model.training)
    return new_model


@dataclass(frozen=True)
class Verification:
    max_abs_logit_diff: float
    greedy_tokens_match: bool
    probe_shape: tuple[int, int]
    new_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "greedy_tokens_match": self.greedy_tokens_match,
            "probe_shape": list(self.probe_shape),
            "new_tokens": self.new_tokens,
        }


def probe_batch(vocab_size: int, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of token ids for verification (independent of any tokenizer)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def greedy_tokens(model: nn.Module, probe: torch.Tensor, new_tokens: int, use_cache: bool) -> torch.Tensor:
    """Exactly ``new_tokens`` greedy tokens after ``probe`` (no padding; EOS does not stop early)."""
    return model.generate(
        probe,
        attention_mask=torch.ones_like(probe),  # said explicitly so generate does not guess
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


@torch.no_grad()
def verify_hardened(
    source: nn.Module, hardened: nn.Module, keep: Sequence[int], probe: torch.Tensor, new_tokens: int = 8
) -> Verification:
    """Compare the hardened model with the masked view of ``source`` on ``probe``.

    Logits are compared in fp32 on a full-sequence forward; generation is greedy, the hardened
    model *with* its KV cache and the masked view without one (see masking.py for why).
    """
    probe = probe.to(input_device(source))
    with masked_view(source, keep):
        want = source(input_ids=probe, use_cache=False).logits.float()
        want_tokens = greedy_tokens(source, probe, new_tokens, use_cache=False)
    got = hardened(input_ids=probe, use_cache=False).logits.float()
    got_tokens = greedy_tokens(hardened, probe, new_tokens, use_cache=True)
    return Verification(
        max_abs_logit_diff=(want - got).abs().max().item(),
        greedy_tokens_match=bool(torch.equal(want_tokens, got_tokens)),
        probe_shape=tuple(probe.shape),
        new_tokens=new_tokens,
    )


class HardenConfig(StepConfig):
    """What ``e3prune harden`` takes. Give exactly one of ``keep_layers`` / ``remove_layers``."""

    model: str = Field(description="source checkpoint directory (save_pretrained layout)")
    output: str = Field(description="where to write the pruned checkpoint (local directory or s3:// URI)")
    keep_layers: list[int] | None = Field(None, description="decoder layer ids to keep (0-based)")
    remove_layers: list[int] | None = Field(None, description="decoder layer ids to remove (0-based)")
    revision: str | None = Field(None, description="source revision recorded in pruning.json")
    method: str = Field("manual", description="how the keep-set was chosen, recorded in pruning.json")
    dtype: str = Field("auto", description="dtype to load and save in: " + ", ".join(DTYPES))
    verify: bool = True
    verify_atol: float = Field(1e-5, gt=0, description="max |logit diff| (fp32) against the masked view")
    device: Device = Field(
        "auto",
        description="where the source is loaded and the verification runs: auto and cpu: the CPU, in dtype; "
        "cuda: GPUs in fp32 (one GPU, else sharded), then saved from the CPU in dtype (auto: the checkpoint's own)",
    )
    overwrite: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict, description="extra entries for pruning.json")
    linear_correction: bool = Field(
        False,
        description="replace each removed run by a least-squares linear map folded into the preceding kept "
        "layer's MLP output projection (docs/method.md, Linear correction); needs calibration_data",
    )
    calibration_data: str | None = Field(
        None, description="sampled data or a teacher cache whose search split fits the linear correction"
    )
    calibration_tokens: int = Field(65_536, ge=1, description="search-split tokens the linear correction is fitted on")
    calibration_batch_size: int = Field(8, ge=1, description="sequences per forward while fitting the correction")
    linear_correction_ridge: float = Field(
        1e-4, ge=0, description="ridge towards the identity map, relative to the mean of diag(MᵀM)"
    )
    linear_correction_inputs: Literal["pruned", "full"] = Field(
        "pruned",
        description="where layer i's residual and MLP output come from: the pruned model with the earlier "
        "runs' maps in place (pruned), or the full model (full); the target is always the full model",
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"must be one of {', '.join(DTYPES)}")
        return v

    @model_validator(mode="after")
    def _one_selection(self) -> HardenConfig:
        if (self.keep_layers is None) == (self.remove_layers is None):
            raise ValueError("give exactly one of keep_layers or remove_layers")
        if self.linear_correction and not self.calibration_data:
            raise ValueError("linear_correction needs calibration_data (sampled data or a teacher cache)")
        return self


@dataclass(frozen=True)
class HardenResult:
    output: str
    kept_layers: list[int]
    removed_layers: list[int]
    verification: Verification | None
    pruning: dict[str, Any]


def _saved_dtype(dtype: str, config: Any) -> torch.dtype:
    """The dtype a checkpoint is saved in: ``dtype``, or for ``auto`` the one its config records (fp32 if none)."""
    if dtype != "auto":
        return DTYPES[dtype]
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if isinstance(own, torch.dtype) else torch.float32


def resolve_keep(cfg: HardenConfig, num_layers: int) -> list[int]:
    if cfg.keep_layers is not None:
        return validate_keep(cfg.keep_layers, num_layers, field="keep_layers")
    return keep_from_removed(cfg.remove_layers or [], num_layers, field="remove_layers")


def linear_correction_record(cfg: HardenConfig, source: nn.Module, keep: Sequence[int]) -> dict[str, Any]:
    """Fit the linear correction on the calibration search split, fold it into ``source`` (in place)
    and return what pruning.json records of it."""
    from e3prune.linear_correction import apply_linear_correction, calibration_input_ids, fit_linear_correction

    t0 = time.time()
    ids = calibration_input_ids(cfg.calibration_data, cfg.calibration_tokens)
    runs = fit_linear_correction(
        source,
        keep,
        ids,
        batch_size=cfg.calibration_batch_size,
        ridge=cfg.linear_correction_ridge,
        inputs=cfg.linear_correction_inputs,
    )
    apply_linear_correction(source, runs)
    log.info("linear correction: %d runs fitted on %d tokens in %.1fs", len(runs), ids.numel(), time.time() - t0)
    return {
        "calibration_data": str(cfg.calibration_data),
        "calibration_split": "search",
        "calibration_tokens": int(ids.numel()),
        "ridge": cfg.linear_correction_ridge,
        "inputs": cfg.linear_correction_inputs,
        "corrected_layers": [r.folded_into for r in runs if r.skipped is None],
        "runs": [r.as_dict() for r in runs],
    }


def harden_checkpoint(cfg: HardenConfig) -> HardenResult:
    """The step: validate everything, load, harden, verify, and write the checkpoint atomically."""
    follow_cpu_quota()
    check_device(cfg.device)
    config = load_config(cfg.model)  # path and architecture checked before any weights load
    num_layers = config.num_hidden_layers
    keep = resolve_keep(cfg, num_layers)
    storage.check_output(cfg.output, cfg.overwrite)
    removed = [i for i in range(num_layers) if i not in set(keep)]

    started = time.time()
    on_gpu = cfg.device == "cuda"  # verified in fp32 there; the CPU (the default) verifies in dtype, exactly
    source, _ = load_placed(cfg.model, cfg.device if on_gpu else "cpu", torch.float32 if on_gpu else cfg.dtype)
    tokenizer = load_tokenizer(cfg.model)
    correction = None
    if cfg.linear_correction:
        # Folded into the source first, so the masked view of the corrected source is what the
        # hardened checkpoint must reproduce (the verification below checks exactly that).
        correction = linear_correction_record(cfg, source, keep)
    hardened = harden(source, keep, share_weights=True)  # the source is discarded after saving
    if on_gpu:
        hardened = dispatch_kept_layers(hardened, source, get_adapter(source).layers_path, keep)
    verification = None
    if cfg.verify:
        verification = verify_hardened(source, hardened, keep, probe_batch(config.vocab_size))
        if verification.max_abs_logit_diff > cfg.verify_atol or not verification.greedy_tokens_match:
            raise E3PruneError(
                f"the hardened model does not reproduce the masked source: max |logit diff| "
                f"{verification.max_abs_logit_diff:.3g} (allowed {cfg.verify_atol:g}), greedy tokens "
                f"{'match' if verification.greedy_tokens_match else 'differ'}; nothing was written",
                field="verify",
            )
    if on_gpu:  # saved from the CPU in the dtype asked for, not the fp32 the verification used
        hardened = undispatch(hardened).to("cpu", _saved_dtype(cfg.dtype, config))
    pruning = {
        "format_version": 1,
        "source": {
            "model": str(cfg.model),
            "revision": cfg.revision or getattr(config, "_commit_hash", None),
            "model_type": config.model_type,
            "architectures": list(getattr(config, "architectures", None) or [type(source).__name__]),
            "num_hidden_layers": num_layers,
        },
        "num_hidden_layers": len(keep),
        "kept_layers": keep,
        "removed_layers": removed,
        "removed_ratio": len(removed) / num_layers,
        "method": cfg.method,
        "verification": verification.as_dict() if verification else None,
        "linear_correction": correction,
        "e3prune_version": __version__,
        **cfg.metadata,
    }
    with storage.output_dir(cfg.output, cfg.overwrite) as tmp:
        hardened.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PRUNING_FILE).write_text(json.dumps(pruning, indent=2) + "\n")
    log.info("hardened %d -> %d layers in %.1fs: %s", num_layers, len(keep), time.time() - started, cfg.output)
    return HardenResult(cfg.output, keep, removed, verification, pruning)
