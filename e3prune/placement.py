"""Where a model goes: one GPU, sharded over the pod's GPUs, or the CPU (docs/architecture.md).

Every step that loads a frozen model for a forward (teacher-logits, search, select, harden's
verification, evaluate) asks :func:`load_placed`, which sizes the checkpoint from its config (a
meta-device instance: no weights read), asks :func:`plan_placement` with the free memory of the
visible GPUs, and only then loads the weights. :func:`plan_placement` is pure, so the decision is
tested with made-up numbers:

- ``device="cpu"``, or ``"auto"`` with no visible GPU: the CPU, in fp32 (unchanged from before).
- ``device="cuda"`` with no visible GPU: one :class:`E3PruneError` on ``device``, before any
  weights load.
- GPUs visible: bf16 weights (frozen models: 2 bytes a parameter; a step may ask for another
  dtype). The weights plus a working margin of :data:`WORKING_MARGIN` (25 %) of their size, for
  activations, the KV cache and the logits of a batch, must fit: on the first GPU with that much
  free memory, else sharded over all visible GPUs with accelerate's big-model placement (a
  balanced ``device_map`` from ``infer_auto_device_map``, each GPU's budget its free memory
  divided by 1 + margin, decoder layers never split: the model's ``_no_split_modules``), else one
  error on ``device`` that says how much is needed and how much the GPUs have free.

A sharded model moves its inputs to the devices of its layers and its outputs back to the device
of its input (accelerate's hooks); batches go to :func:`input_device`, the embedding's device.
The margin is a budget, not a measurement: a step whose batch needs more (a long sequence, a
large vocabulary) runs out of GPU memory and should lower its ``batch_size``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from e3prune.errors import E3PruneError

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
WORKING_MARGIN = 0.25  # activations, KV cache, logits: a quarter of the weights' bytes beside them
GPU_DTYPE = torch.bfloat16  # frozen models on a GPU
CPU_DTYPE = torch.float32
DEVICE_HELP = (
    "where the model runs: auto (the GPUs when any is visible, else the CPU), cpu, or cuda (fail when no GPU "
    "is visible); on GPUs weights are bf16, on one GPU when they fit with a 25 % margin, else sharded over "
    "the visible GPUs (docs/operations.md, GPU nodes)"
)


@dataclass(frozen=True)
class Placement:
    """Where a model's weights go and in which dtype.

    ``kind``: ``cpu``, ``cuda`` (one GPU) or ``sharded`` (over several GPUs). ``device_map`` is
    what ``from_pretrained`` takes (``{"": i}`` on one GPU; module name → GPU on sharding; None on
    the CPU). ``main_device`` is where inputs go. ``max_memory``: the per-GPU weight budget of a
    sharded model. ``needed_bytes``: the weights plus the working margin (0 on the CPU).
    """

    kind: Literal["cpu", "cuda", "sharded"]
    dtype: torch.dtype | str
    device_map: dict[str, int | str] | None
    main_device: torch.device
    max_memory: dict[int, int] | None = None
    needed_bytes: int = 0

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.kind == "sharded":
            gpus = sorted({d for d in (self.device_map or {}).values() if isinstance(d, int)})
            return f"sharded over GPUs {gpus} in {dtype}"
        return f"{self.main_device} in {dtype}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def visible_devices() -> str:
    """``CUDA_VISIBLE_DEVICES`` as an error message shows it."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset")


def gpu_free_bytes() -> list[int]:
    """Free bytes of every visible GPU (``torch.cuda.mem_get_info``), empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def check_device(device: str, gpus_visible: bool | None = None) -> None:
    """Refuse ``device="cuda"`` when no GPU is visible (a step calls this before loading anything)."""
    if device not in DEVICES:
        raise E3PruneError(f"must be one of {', '.join(DEVICES)}, got {device!r}", field="device")
    visible = torch.cuda.is_available() if gpus_visible is None else gpus_visible
    if device == "cuda" and not visible:
        raise E3PruneError(
            f"cuda asked for but no GPU is visible (CUDA_VISIBLE_DEVICES={visible_devices()}); "
            "give device=auto or cpu, or run the step on a GPU node",
            field="device",
        )


def plan_placement(
    param_bytes_fp32: int,
    n_params: int,
    device: str,
    gpus: Sequence[int],
    *,
    dtype_override: torch.dtype | str | None = None,
    margin: float = WORKING_MARGIN,
    model: nn.Module | None = None,
    visible: str = "unset",
) -> Placement:
    """Where a model of ``n_params`` parameters (``param_bytes_fp32`` bytes in fp32) goes.

    ``gpus``: free bytes of each visible GPU (index = CUDA ordinal). ``dtype_override``: the dtype
    a step insists on (a torch dtype, or ``"auto"``: the checkpoint's own, sized as fp32); default
    fp32 on the CPU and bf16 on GPUs. ``model``: the model on the meta device; a sharded placement
    needs it for its ``device_map`` (without it, ``device_map`` is None). ``visible`` is
    ``CUDA_VISIBLE_DEVICES`` for the messages. Pure: reads no device and no file.
    """
    if device not in DEVICES:
        raise E3PruneError(f"must be one of {', '.join(DEVICES)}, got {device!r}", field="device")
    if device == "cuda" and not gpus:
        raise E3PruneError(
            f"cuda asked for but no GPU is visible (CUDA_VISIBLE_DEVICES={visible}); "
            "give device=auto or cpu, or run the step on a GPU node",
            field="device",
        )
    if device == "cpu" or not gpus:
        return Placement("cpu", dtype_override or CPU_DTYPE, None, torch.device("cpu"))
    dtype = dtype_override or GPU_DTYPE
    size = 4 if isinstance(dtype, str) else torch.empty((), dtype=dtype).element_size()
    weights = math.ceil(param_bytes_fp32 * size / 4)
    needed = math.ceil(weights * (1 + margin))
    for i, free in enumerate(gpus):
        if needed <= free:
            return Placement("cuda", dtype, {"": i}, torch.device("cuda", i), needed_bytes=needed)
    budget = {i: int(free / (1 + margin)) for i, free in enumerate(gpus)}
    name = str(dtype).removeprefix("torch.")
    shortfall = (
        f"{name} weights of {n_params / 1e9:.2f} B parameters need {_gib(weights)}, {_gib(needed)} with the "
        f"{margin:.0%} working margin; the {len(gpus)} visible GPU{'s' if len(gpus) > 1 else ''} "
        f"(CUDA_VISIBLE_DEVICES={visible}) have {_gib(sum(gpus))} free in all, the largest {_gib(max(gpus))}"
    )
    if len(gpus) == 1 or weights > sum(budget.values()):
        raise E3PruneError(
            f"the model does not fit: {shortfall}; give the step more or larger GPUs, or device=cpu", field="device"
        )
    device_map = None if model is None else _sharded_map(model, dtype, budget, shortfall)
    first = next((d for d in (device_map or {}).values() if isinstance(d, int)), 0)
    return Placement("sharded", dtype, device_map, torch.device("cuda", first), budget, needed)


def _sharded_map(model: nn.Module, dtype: torch.dtype | str, budget: dict[int, int], shortfall: str) -> dict:
    """accelerate's balanced device map of ``model`` (meta) within ``budget``, decoder layers whole."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    dtype = torch.float32 if isinstance(dtype, str) else dtype
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(model, max_memory=dict(budget), no_split_module_classes=no_split, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    off_gpu = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
    if off_gpu:
        device_map = infer_auto_device_map(
            model, max_memory=dict(budget), no_split_module_classes=no_split, dtype=dtype
        )
        off_gpu = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
    if off_gpu:
        raise E3PruneError(
            f"the model does not fit when split into whole decoder layers ({', '.join(off_gpu)} would be needed): "
            f"{shortfall}; give the step more or larger GPUs, or device=cpu",
            field="device",
        )
    return device_map


@dataclass(frozen=True)
class ModelSize:
    """A checkpoint sized from its config alone: its parameters, and the model on the meta device."""

    config: Any
    meta: nn.Module
    n_params: int

    @property
    def param_bytes_fp32(self) -> int:
        return 4 * self.n_params


def model_size(path: str | os.PathLike, field: str = "model") -> ModelSize:
    """Instantiate the checkpoint's architecture on the meta device (no weights) and count its parameters."""
    from transformers import AutoModelForCausalLM

    from e3prune.model_io import load_config

    config = load_config(path, field)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return ModelSize(config, meta, sum(p.numel() for p in meta.parameters()))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """A step's dtype setting as a placement takes it: None, a torch dtype, or ``"auto"`` (the checkpoint's own)."""
    from e3prune.model_io import DTYPES

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise E3PruneError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}", field="dtype")
    return DTYPES[dtype]


def load_placed(
    path: str | os.PathLike,
    device: str = "auto",
    dtype_override: torch.dtype | str | None = None,
    field: str = "model",
) -> tuple[nn.Module, torch.device]:
    """Load a supported causal LM where :func:`plan_placement` puts it, in eval mode.

    Returns the model and its input device. ``device`` is checked before any weights load; every
    load refuses missing or unexpected tensors (:func:`e3prune.model_io.check_loaded_weights`).
    """
    from e3prune.model_io import load_causal_lm

    check_device(device)
    size = model_size(path, field)
    placement = plan_placement(
        size.param_bytes_fp32,
        size.n_params,
        device,
        gpu_free_bytes() if device != "cpu" else [],
        dtype_override=resolve_dtype(dtype_override),
        model=size.meta,
        visible=visible_devices(),
    )
    model = load_causal_lm(path, placement.dtype, field, device_map=placement.device_map)
    model.placement = placement
    return model, input_device(model)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: the device of its input embedding."""
    return model.get_input_embeddings().weight.device


def dispatch_kept_layers(new_model: nn.Module, source: nn.Module, layers_path: str, keep: Sequence[int]) -> nn.Module:
    """Give ``new_model`` (the ``keep`` layers of ``source``, renumbered 0..k-1, sharing its tensors)
    the device map of a sharded ``source``, so that it runs across the same GPUs; a source on one
    device needs nothing (the shared tensors are already there)."""
    device_map = getattr(source, "hf_device_map", None) or {}
    if len({d for d in device_map.values()}) <= 1:
        return new_model
    from accelerate import dispatch_model

    old_to_new = {old: new for new, old in enumerate(keep)}
    layer = re.compile(re.escape(layers_path) + r"\.(\d+)(\.|$)")
    renamed: dict[str, int | str] = {}
    for name, dev in device_map.items():
        m = layer.match(name)
        if m is None:
            renamed[name] = dev
        elif int(m.group(1)) in old_to_new:
            renamed[f"{layers_path}.{old_to_new[int(m.group(1))]}{name[m.end(1) :]}"] = dev
    return dispatch_model(new_model, device_map=renamed)


def undispatch(model: nn.Module) -> nn.Module:
    """Remove accelerate's device hooks (before moving a dispatched model, e.g. to save it from the CPU)."""
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
    return model


def align_io(model: nn.Module, device: torch.device, inputs_on: torch.device) -> nn.Module:
    """``model`` (input device ``device``) made to take inputs on ``inputs_on`` and give its outputs
    there: nothing when they are the same device or the model is sharded (accelerate's hooks already
    do it), else accelerate's hook that moves the inputs in and the outputs back."""
    if device == inputs_on or getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return model
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(model, AlignDevicesHook(execution_device=device, io_same_device=True), append=True)
    return model
