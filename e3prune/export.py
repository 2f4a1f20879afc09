"""Export: publish the final checkpoint, with a model card and its metrics, to its durable place.

The destination is ``<storage_prefix>/models/<registered model name>/<run key>`` — S3 on a
cluster, a directory locally. Publishing goes through :func:`e3prune.storage.output_dir`: every
file is uploaded first and the ``_COMPLETE.json`` marker (sizes and sha256) last, so a failure
part-way (S3 unreachable, pod evicted) leaves a prefix without a marker, which ``register`` and
every reader refuse. Re-running the step for the same run replaces such a leftover; a complete
export with equal content is kept as is (the retry of a step that had actually finished).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from e3prune import storage
from e3prune.config import StepConfig
from e3prune.errors import E3PruneError
from e3prune.harden import PRUNING_FILE
from e3prune.model_io import load_config, model_dir

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
# What a served model needs; training records (metrics.jsonl of distillation) stay with the run.
SKIP = {"metrics.jsonl", "distillation.json", storage.MARKER}


class ExportConfig(StepConfig):
    """What ``export`` takes: the checkpoint, where to publish it, and what the card says."""

    model: str = Field(description="the checkpoint to export (local directory or s3:// URI)")
    destination: str = Field(description="s3://bucket/prefix or local directory to publish to")
    metrics: str | None = Field(None, description="metrics.json of the evaluate step, copied beside the model")
    model_name: str = Field("", description="registered model name, for the card")
    source_model: str = Field("", description="the source model, for the card")
    source_revision: str = Field("", description="the source revision, for the card")


def model_card(pruning: dict[str, Any], metrics: dict[str, Any] | None, cfg: ExportConfig) -> str:
    """A Hugging Face model card: YAML front matter for hubs and registries, then a short table."""
    source = pruning.get("source", {})
    kept = pruning.get("kept_layers", [])
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [e3-pruner, layer-pruning, distillation]",
    ]
    if cfg.source_model and not cfg.source_model.startswith(("s3://", "/", "builtin:")):
        lines.append(f"base_model: {cfg.source_model}")
    lines += ["---", "", f"# {cfg.model_name or 'pruned model'}", ""]
    lines.append(
        f"Decoder-layer pruned from `{cfg.source_model or source.get('model')}` "
        f"(revision `{(cfg.source_revision or str(source.get('revision')))[:16]}`) with e3-pruner: "
        f"{source.get('num_hidden_layers')} → {len(kept)} layers, "
        f"method `{pruning.get('method')}`, then distilled from the teacher's top-K logits."
    )
    lines += ["", f"Kept layers: `{kept}`", f"Removed layers: `{pruning.get('removed_layers')}`", ""]
    lines += recovery_lines(pruning.get("distillation"))
    if metrics:
        from e3prune.report import summary_markdown

        lines += ["## Evaluation", "", summary_markdown(metrics)]
    return "\n".join(lines) + "\n"


LOSS_NAMES = {
    "kd": "plain top-K KD",
    "entropy_kd": "E³'s entropy-aware top-K KD with the next-token CE term",
    "ce": "next-token cross-entropy only",
}


def recovery_lines(distillation: dict[str, Any] | None) -> list[str]:
    """The card's recovery section: the loss the student was distilled with, and when the other loss
    may be better (docs/method.md, Stage 5: the two validation models disagree)."""
    if not distillation:
        return []
    loss = distillation.get("loss")
    lines = [
        "## Recovery",
        "",
        f"Distilled with `{loss}` ({LOSS_NAMES.get(loss, loss)}; γ = {distillation.get('gamma')}, "
        f"λ = {distillation.get('ce_weight')}) on {distillation.get('tokens', 0):,} tokens.",
    ]
    if loss == "kd":
        lines.append(
            "The paper's entropy-aware loss (`distill_loss: entropy_kd`) is an option, not the default: in "
            "e3-pruner's end-to-end study it gave 3.5–5.3 % lower held-out perplexity on one model, whose "
            "teacher was weak on the text, and 3.1–3.2 % higher on the other, with lower agreement with the "
            "teacher on both. If the teacher's perplexity on your text is high, distil once with it and compare."
        )
    return lines + [""]


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """The step: check the model, write card + metrics beside it, publish atomically; return where."""
    load_config(cfg.model, field="model")  # a supported checkpoint, before anything is uploaded
    src = model_dir(cfg.model, "model")
    pruning_path = src / PRUNING_FILE
    if not pruning_path.is_file():
        raise E3PruneError(
            f"{cfg.model} has no {PRUNING_FILE}: export takes the output of harden or distill", field="model"
        )
    pruning = json.loads(pruning_path.read_text())
    metrics = None
    if cfg.metrics:
        mdir = storage.input_dir(cfg.metrics, field="metrics")
        metrics = json.loads((mdir / METRICS_FILE).read_text()) if (mdir / METRICS_FILE).is_file() else None
        if metrics is None:
            raise E3PruneError(f"{cfg.metrics} has no {METRICS_FILE}: give the evaluate step's output", field="metrics")

    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name not in SKIP and not p.name.startswith("."))
    card = model_card(pruning, metrics, cfg)
    if _already_published(cfg.destination, src, files, card, metrics):
        log.info("%s already holds this export; nothing to do", cfg.destination)
        return {"uri": cfg.destination, "files": len(files) + 1 + (metrics is not None), "reused": True}
    # No marker (or a failed earlier attempt): replace whatever is there.
    overwrite = not _complete(cfg.destination)
    with storage.output_dir(cfg.destination, overwrite=overwrite, field="destination") as out:
        for p in files:
            target = out / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
        (out / CARD_FILE).write_text(card)
        if metrics is not None:
            (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("exported %s to %s", cfg.model, cfg.destination)
    return {"uri": cfg.destination, "files": len(files) + 1 + (metrics is not None), "reused": False}


def _complete(uri: str) -> bool:
    if storage.is_s3(uri):
        bucket, prefix = storage.split_s3(uri, "destination")
        client = storage._client()
        with storage._s3_errors(uri, "destination", "read"):
            return storage._exists(client, bucket, f"{prefix}/{storage.MARKER}")
    return Path(uri).is_dir() and any(Path(uri).iterdir())


def _already_published(uri: str, src: Path, files: list[Path], card: str, metrics: dict | None) -> bool:
    """True when ``uri`` is a complete export of exactly these files (a retried step that had finished).

    Compared through the published marker's sizes and sha256, so nothing is downloaded.
    """
    if not _complete(uri):
        return False
    if storage.is_s3(uri):
        published = storage.read_marker(uri, field="destination")
    else:
        published = storage.directory_digest(Path(uri))
    ours = {p.relative_to(src).as_posix(): storage.file_digest(p) for p in files}
    with tempfile.TemporaryDirectory() as tmp:
        extra = {CARD_FILE: card} | (
            {METRICS_FILE: json.dumps(metrics, indent=2) + "\n"} if metrics is not None else {}
        )
        for name, text in extra.items():
            (Path(tmp) / name).write_text(text)
            ours[name] = storage.file_digest(Path(tmp) / name)
    return published == ours
