"""Reading Hugging Face checkpoints from disk (local or ``s3://``) and describing them.

Every function that takes a model path checks it *before* loading weights, so a wrong path or
an unsupported architecture fails in a second with a clear message, not after minutes of I/O.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from e3prune import storage
from e3prune.adapters import ArchitectureAdapter, get_adapter
from e3prune.errors import E3PruneError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(path: str | os.PathLike, field: str = "model") -> Path:
    """``path`` as a local checkpoint directory, or an error that says what is wrong with it.

    An ``s3://`` URI written by a step (harden, distill, export) is downloaded once into the
    verified cache (:func:`e3prune.storage.input_dir`), so every step reads checkpoints by URI.
    """
    if str(path).startswith("s3://"):
        path = storage.input_dir(str(path), field)
    p = Path(path)
    if not p.exists():
        raise E3PruneError(f"{p} does not exist; give a directory written by save_pretrained", field=field)
    if not p.is_dir():
        raise E3PruneError(f"{p} is a file, not a model directory (expected config.json and weights)", field=field)
    if not (p / "config.json").is_file():
        raise E3PruneError(f"{p} is not a model directory: it has no config.json", field=field)
    return p


def load_config(path: str | os.PathLike, field: str = "model") -> Any:
    """The checkpoint's config, after checking the directory and that the architecture is supported."""
    from transformers import AutoConfig

    p = model_dir(path, field)
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise E3PruneError(f"{p}/config.json cannot be read as a transformers config: {exc}", field=field) from None
    get_adapter(config)
    return config


def load_causal_lm(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    field: str = "model",
    device_map: dict[str, int | str] | None = None,
):
    """Load a supported causal LM (no remote code) in eval mode.

    ``dtype``: a name of :data:`DTYPES` or a torch dtype. ``device_map``: where the weights go
    (``from_pretrained``'s argument; None: the CPU). Steps do not call this directly: they place
    their models with :func:`e3prune.placement.load_placed`, which decides the dtype and device map.
    """
    from transformers import AutoModelForCausalLM

    load_config(path, field)
    path = model_dir(path, field)  # the local copy of an s3:// checkpoint
    if not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise E3PruneError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}", field="dtype")
    from safetensors import SafetensorError

    placed = {} if device_map is None else {"device_map": device_map}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype],
            trust_remote_code=False,
            output_loading_info=True,
            **placed,
        )
    except (OSError, SafetensorError) as exc:
        raise E3PruneError(f"{path} has a config but its weights cannot be loaded: {exc}", field=field) from None
    check_loaded_weights(info, path, field)
    return model.eval()


def check_loaded_weights(info: dict[str, list], path: str | os.PathLike, field: str) -> None:
    """Refuse a checkpoint whose tensors do not match the model: transformers would fill a missing
    weight with random values and drop an unexpected one, both silently (tied weights are not missing)."""
    problems = []
    for kind, names in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys"))):
        names = sorted(names or [])
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} {kind} ({shown})")
    mismatched = [str(m[0]) if isinstance(m, tuple | list) else str(m) for m in info.get("mismatched_keys") or []]
    if mismatched:
        problems.append(f"{len(mismatched)} with the wrong shape ({', '.join(sorted(mismatched)[:5])})")
    if problems:
        raise E3PruneError(
            f"{path}: the checkpoint's tensors do not match its config: {'; '.join(problems)}; "
            "it is incomplete or from another model",
            field=field,
        )


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer, or ``None`` when the directory has none."""
    from transformers import AutoTokenizer

    p = model_dir(path, "model") if str(path).startswith("s3://") else Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(p, trust_remote_code=False)


def describe(model_or_config: Any) -> dict[str, Any]:
    """Layers, per-layer config fields and parameter counts; builds on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    layers = adapter.decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in model.parameters())
    fields = {
        name: getattr(config, name) for name in adapter.per_layer_fields if getattr(config, name, None) is not None
    }
    fields.update(_index_fields(adapter, config))
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": getattr(config, "hidden_size", None),
        "parameters": {"total": total, "decoder_layers": sum(per_layer), "outside_layers": total - sum(per_layer)},
        "parameters_per_layer": per_layer,
        "per_layer_fields": fields,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _index_fields(adapter: ArchitectureAdapter, config: Any) -> dict[str, Any]:
    """The current values of the index-based fields an adapter renumbers (for display)."""
    if adapter.index_fields is None:
        return {}
    names = adapter.index_fields(config, list(range(config.num_hidden_layers))).keys()
    return {n: getattr(config, n, None) for n in names}
