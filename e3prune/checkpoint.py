"""Reading Hugging Face checkpoints from disk, describing them, and writing output directories
so that nothing looks complete until it is.

Every function that takes a model path checks it *before* loading weights, so a wrong path or
an unsupported architecture fails in a second with a clear message, not after minutes of I/O.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from e3prune.adapters import ArchitectureAdapter, get_adapter
from e3prune.errors import E3PruneError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(path: str | os.PathLike, field: str = "model") -> Path:
    """``path`` as a local checkpoint directory, or an error that says what is wrong with it.

    An ``s3://`` URI written by a step (harden, distill, export) is downloaded once into the
    verified cache (:func:`e3prune.storage.input_dir`), so every step reads checkpoints by URI.
    """
    if str(path).startswith("s3://"):
        from e3prune import storage  # storage imports this module; import on use

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


def load_causal_lm(path: str | os.PathLike, dtype: str = "auto", field: str = "model"):
    """Load a supported causal LM (no remote code) in eval mode."""
    from transformers import AutoModelForCausalLM

    load_config(path, field)
    path = model_dir(path, field)  # the local copy of an s3:// checkpoint
    if dtype not in DTYPES:
        raise E3PruneError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}", field="dtype")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False)
    except OSError as exc:
        raise E3PruneError(f"{path} has a config but its weights cannot be loaded: {exc}", field=field) from None
    return model.eval()


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


def check_output_dir(path: str | os.PathLike, overwrite: bool, field: str = "output") -> Path:
    """Check, before any heavy work, that ``path`` can be written as a new output directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise E3PruneError(f"{p} is a file; give a directory path", field=field)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise E3PruneError(f"{p} exists and is not empty; choose a new directory or pass overwrite", field=field)
    parent = p.parent if p.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise E3PruneError(f"cannot create {parent}: {exc.strerror}", field=field) from None
    if not os.access(parent, os.W_OK):
        raise E3PruneError(f"{parent} is not writable", field=field)
    return p


@contextmanager
def staged_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On failure the temporary directory is removed and ``path`` is untouched, so a crashed or
    rejected run never leaves an output directory that looks complete.
    """
    final = check_output_dir(path, overwrite)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
