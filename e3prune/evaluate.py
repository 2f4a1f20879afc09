"""Evaluation of teacher, pruned and distilled models (docs/method.md, Stage 6).

For every model given — the teacher (the original), ``pruned`` (the hardened checkpoint before
recovery) and ``student`` (the distilled checkpoint), at least one of the last two — on the eval
split of the sample step's data:

- held-out perplexity over every next-token position, top-1 agreement and full-vocabulary
  KL(teacher ‖ model) at every position (:mod:`e3prune.metrics`);
- layers and parameter counts (:func:`e3prune.model_io.describe`);
- the perplexity ratio to the teacher, and the fraction of the pruned → teacher perplexity gap
  that a model closes (:func:`e3prune.metrics.gap_closed`): 0 for the pruned model itself, 1 for
  a student as good as the teacher, null without a pruned model or a gap;
- prefill and decode throughput of the teacher and the student (the pruned model when there is
  no student), interleaved, medians and spread (:mod:`e3prune.speed`, which
  ``benchmarks/speed.py`` uses too), checked against the bound the layer counts set and taken
  again when suspect; ``speed.reliable`` says whether the promotion gate may trust it;
- optionally, lm-evaluation-harness tasks on the in-memory models (``pip install
  'e3-pruner[eval]'``; :mod:`e3prune.lm_eval_tasks.adapter`), e.g. ``python_stdlib_cloze``, the
  task shipped in ``e3prune/lm_eval_tasks``.

Memory: the models are loaded together (a model given twice is loaded once), in eval mode, each
placed by :func:`e3prune.placement.load_placed` (``device``): on the CPU in fp32, or on GPUs in
bf16, on the first GPU with room for it, else sharded over the visible GPUs. Beside the weights, a batch holds a few fp32 tensors of B × S × V (two
models' logits, their log-softmax, the KL terms): about 6 · B · S · V · 4 bytes. That is small
for the reference model; for a 150 k-vocabulary model at S = 2048 it is ~7 GB per sequence of
the batch, so lower ``batch_size`` there, and give ``dtype=bfloat16`` when the three models'
weights do not fit side by side in fp32.

Output (``output``, a local directory or ``s3://`` prefix, written through :mod:`e3prune.storage`):

``metrics.json`` — format 1, a stable schema (keys are always present; null where not measured)::

    {
      "format_version": 1,
      "models": {                        # null for a role that was not given
        "teacher" | "pruned" | "student": {
          "path": str, "layers": int,
          "parameters": {"total": int, "decoder_layers": int, "outside_layers": int},
          "loss": float,                 # mean next-token CE on the eval split, nats
          "perplexity": float            # exp(loss)
        } | null
      },
      "comparisons": {                   # against the teacher; null for a role not given
        "pruned" | "student": {
          "top1_agreement": float,       # in [0, 1]
          "kl": float,                   # mean KL(teacher ‖ model), full vocabulary, nats/token
          "perplexity_ratio": float,     # ppl_model / ppl_teacher
          "gap_closed": float | null     # (ppl_pruned − ppl_model) / (ppl_pruned − ppl_teacher)
        } | null
      },
      "speed": null | {                  # null when speed=false
        "device": str, "dtype": str, "threads": int, "repeats": int,
        "prefill": {"batch": int, "length": int},
        "decode": {"batch": int, "prompt": int, "new_tokens": int},
        "models": {role: {"prefill_tokens_per_second": float, "decode_tokens_per_second": float,
                          "prefill_seconds": float, "decode_seconds": float,      # medians
                          "prefill_seconds_min": float, "prefill_seconds_max": float,
                          "decode_seconds_min": float, "decode_seconds_max": float}},  # spread
        "speedup": {role: {"prefill": float, "decode": float}},  # teacher time / model time
        "relative_spread": {role: {"prefill": float | null, "decode": float | null}},  # (max − min) / median
        "remeasured": bool,              # the first measurement was suspect and was taken again
        "reliable": bool,                # within the layer bound and the spread limit (e3prune.speed)
        "unreliable_reason": str | null  # why not, when not
      },
      "lm_eval": {task: {role: {metric: float | null, "samples": int}}},   # {} without tasks
      "data": {"uri": str, "split": "eval", "seq_len": int, "sequences": int, "split_sequences": int,
               "tokens": int, "scored_tokens": int, "tokenizer_fingerprint": str, "seed": int | null},
      "config": {...}                    # the EvaluateConfig as given, defaults filled in
    }

``summary.md`` — a Markdown table for a person (the Kubeflow UI shows it;
:func:`e3prune.report.summary_markdown`): one row per model with layers, parameters, held-out
perplexity, perplexity ratio, top-1 agreement, KL, prefill and decode tokens/s and the lm-eval
scores, then the share of the perplexity gap the student closes and its speedup.

Entry points: :func:`evaluate` (returns the metrics dict) and ``e3prune evaluate`` (prints the table).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from e3prune import storage
from e3prune.config import PipelineParameter, StepConfig
from e3prune.data import load_split, read_manifest, tokenizer_fingerprint
from e3prune.errors import E3PruneError
from e3prune.lm_eval_tasks.adapter import check_lm_eval_tasks, run_lm_eval
from e3prune.metrics import HeldOut, gap_closed, heldout_sums
from e3prune.model_io import describe, load_config, load_tokenizer
from e3prune.placement import DEVICE_HELP, Device, align_io, check_device, load_placed
from e3prune.reference import default_model
from e3prune.report import summary_markdown
from e3prune.speed import SpeedSettings, measure_speed
from e3prune.threads import follow_cpu_quota

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLIT = "eval"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
ROLES = ("teacher", "pruned", "student")
COMPARED = ("pruned", "student")


class EvaluateConfig(StepConfig):
    """What ``e3prune evaluate`` takes. Speed defaults follow ``benchmarks/speed.py``."""

    teacher: str = Field(default_factory=default_model, description="the original model directory")
    pruned: str | None = Field(None, description="hardened checkpoint, before distillation")
    student: str | None = Field(
        None, validate_default=True, description="distilled checkpoint (give pruned, student or both)"
    )
    data: str = Field(description="output of the sample step (local directory or s3:// URI) with an eval split")
    output: str = Field(description="where to write metrics.json and summary.md (local directory or s3:// URI)")
    eval_sequences: int | None = Field(None, ge=1, description="use at most this many eval-split sequences")
    batch_size: Annotated[int, PipelineParameter("eval_batch_size")] = Field(
        8, ge=1, le=4096, description="sequences per evaluation forward; also lm-eval's batch size"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype: auto is the placement's (fp32 on the CPU, bf16 on GPUs)"
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    speed: bool = Field(True, description="measure prefill and decode tokens/s of teacher and student")
    speed_repeats: int = Field(5, ge=1, le=1000, description="interleaved timed runs per model; medians are reported")
    prefill_batch: int = Field(8, ge=1, description="sequences in the timed prefill")
    prefill_len: int = Field(256, ge=1, description="tokens per sequence in the timed prefill")
    decode_batch: int = Field(4, ge=1, description="sequences decoded at once")
    decode_prompt: int = Field(32, ge=1, description="prompt tokens before the timed decode")
    decode_tokens: int = Field(64, ge=1, description="greedy tokens generated with the KV cache")
    lm_eval_tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks, e.g. python_stdlib_cloze (shipped)"
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="at most this many items per lm-eval task")
    seed: int = Field(0, ge=0, description="seed of the random tokens the speed runs use")
    overwrite: bool = False

    @field_validator("student")
    @classmethod
    def _pruned_or_student(cls, student: str | None, info: ValidationInfo) -> str | None:
        if student is None and info.data.get("pruned") is None:
            raise ValueError(
                "give pruned (the hardened checkpoint), student (the distilled one) or both; "
                "each is compared with the teacher"
            )
        return student

    @field_validator("lm_eval_tasks")
    @classmethod
    def _task_names(cls, tasks: list[str]) -> list[str]:
        if any(not t.strip() for t in tasks):
            raise ValueError("task names must not be empty")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"each task once, please: {tasks}")
        return tasks

    def paths(self) -> dict[str, str]:
        """The models given, by role, in the order teacher, pruned, student."""
        return {role: p for role in ROLES if (p := getattr(self, role)) is not None}

    def speed_settings(self) -> SpeedSettings:
        """The speed fields as :mod:`e3prune.speed` takes them."""
        return SpeedSettings(
            repeats=self.speed_repeats,
            prefill_batch=self.prefill_batch,
            prefill_len=self.prefill_len,
            decode_batch=self.decode_batch,
            decode_prompt=self.decode_prompt,
            decode_tokens=self.decode_tokens,
            seed=self.seed,
        )


# --------------------------------------------------------------------------- validation


@dataclass
class EvaluateInputs:
    tokenizer: Any  # the teacher's (every model's is the same, checked)
    manifest: dict[str, Any]
    task_manager: Any  # lm-eval TaskManager, None without tasks


def _check_tokenizers(cfg: EvaluateConfig, configs: dict[str, Any], manifest: dict[str, Any]) -> Any:
    """The teacher's tokenizer, after checking every model's is the data's and its vocabulary the teacher's."""
    fingerprint = manifest["tokenizer"]["fingerprint"]
    tokenizer = None
    for role, path in cfg.paths().items():
        tok = load_tokenizer(path)
        if tok is None:
            raise E3PruneError(
                f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json); save it with the model",
                field=role,
            )
        if tokenizer_fingerprint(tok) != fingerprint:
            raise E3PruneError(
                f"the {role} model's tokenizer ({path}) is not the one the data was sampled with "
                f"({manifest['tokenizer'].get('path')}); every model must share the teacher's tokenizer",
                field=role,
            )
        if tokenizer is None:
            tokenizer = tok
        if configs[role].vocab_size != configs["teacher"].vocab_size:
            raise E3PruneError(
                f"the {role} model has {configs[role].vocab_size} vocabulary rows, the teacher "
                f"{configs['teacher'].vocab_size}; their distributions cannot be compared",
                field=role,
            )
    return tokenizer


def _check_positions(cfg: EvaluateConfig, configs: dict[str, Any], seq_len: int) -> None:
    """The eval sequences and the timed runs fit every model's positions."""
    for role, config in configs.items():
        positions = getattr(config, "max_position_embeddings", None)
        if positions is None:
            continue
        if seq_len > positions:
            raise E3PruneError(
                f"the eval sequences have {seq_len} tokens, the {role} model only {positions} positions; "
                f"sample the data with seq_len ≤ {positions}",
                field="data",
            )
        if cfg.speed and cfg.prefill_len > positions:
            raise E3PruneError(
                f"{cfg.prefill_len} tokens exceed the {role} model's {positions} positions", field="prefill_len"
            )
        if cfg.speed and cfg.decode_prompt + cfg.decode_tokens + 1 > positions:
            raise E3PruneError(
                f"a {cfg.decode_prompt}-token prompt plus {cfg.decode_tokens + 1} generated tokens exceed the "
                f"{role} model's {positions} positions; lower decode_prompt or decode_tokens",
                field="decode_tokens",
            )


def check_evaluate_inputs(cfg: EvaluateConfig) -> EvaluateInputs:
    """Everything that can be checked before loading weights; raises :class:`E3PruneError`."""
    check_device(cfg.device)
    configs = {role: load_config(path, field=role) for role, path in cfg.paths().items()}
    manifest = read_manifest(cfg.data)
    tokenizer = _check_tokenizers(cfg, configs, manifest)
    split = manifest["splits"].get(SPLIT)
    if not split or split.get("sequences", 0) == 0:
        raise E3PruneError(
            f"{cfg.data} has no {SPLIT!r} sequences (its eval budget was 0?); sample it with --eval-tokens > 0",
            field="data",
        )
    _check_positions(cfg, configs, manifest["seq_len"])
    task_manager = check_lm_eval_tasks(cfg.lm_eval_tasks) if cfg.lm_eval_tasks else None
    storage.check_output(cfg.output, cfg.overwrite)
    return EvaluateInputs(tokenizer, manifest, task_manager)


# --------------------------------------------------------------------------- the step


def _load_models(cfg: EvaluateConfig) -> dict[str, torch.nn.Module]:
    """Every role's model in eval mode, placed by ``cfg.device``; a directory given twice is loaded once.

    Each model is placed with the GPU memory the ones before it left; a model that lands on
    another device than the teacher's input moves its inputs there and its outputs back.
    """
    by_path: dict[Path, torch.nn.Module] = {}
    models = {}
    teacher_input = None
    for role, path in cfg.paths().items():
        key = Path(path).resolve()
        if key not in by_path:
            model, device = load_placed(path, cfg.device, None if cfg.dtype == "auto" else cfg.dtype, field=role)
            teacher_input = teacher_input or device
            by_path[key] = align_io(model, device, teacher_input)
        models[role] = by_path[key]
    return models


def _quality(
    cfg: EvaluateConfig, models: dict[str, torch.nn.Module], sums: HeldOut
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics.json``'s ``models`` and ``comparisons`` from the held-out sums."""
    loss = {r: sums.ce_sum[r] / sums.scored for r in models}
    ppl = {r: math.exp(v) for r, v in loss.items()}
    model_metrics: dict[str, Any] = dict.fromkeys(ROLES)
    for role, path in cfg.paths().items():
        info = describe(models[role])
        model_metrics[role] = {
            "path": path,
            "layers": info["num_hidden_layers"],
            "parameters": info["parameters"],
            "loss": loss[role],
            "perplexity": ppl[role],
        }
    comparisons: dict[str, Any] = dict.fromkeys(COMPARED)
    for role in COMPARED:
        if role in models:
            comparisons[role] = {
                "top1_agreement": sums.agree_sum[role] / sums.positions,
                "kl": sums.kl_sum[role] / sums.positions,
                "perplexity_ratio": ppl[role] / ppl["teacher"],
                "gap_closed": gap_closed(ppl["teacher"], ppl.get("pruned"), ppl[role]),
            }
    return model_metrics, comparisons


def _speed(cfg: EvaluateConfig, models: dict[str, torch.nn.Module], tokenizer: Any) -> dict[str, Any] | None:
    """Teacher against the student (the pruned model when there is no student); None when off."""
    if not cfg.speed:
        return None
    timed_role = "student" if "student" in models else "pruned"
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    timed = {"teacher": models["teacher"], timed_role: models[timed_role]}
    return measure_speed(timed, cfg.speed_settings(), pad)


def _data_section(cfg: EvaluateConfig, manifest: dict[str, Any], ids: torch.Tensor, split_sequences: int) -> dict:
    n, seq_len = ids.shape
    return {
        "uri": cfg.data,
        "split": SPLIT,
        "seq_len": seq_len,
        "sequences": n,
        "split_sequences": split_sequences,
        "tokens": n * seq_len,
        "scored_tokens": n * (seq_len - 1),
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
        "seed": manifest.get("seed"),
    }


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """The step: validate, measure, write ``metrics.json`` and ``summary.md``; return the metrics."""
    follow_cpu_quota()
    inputs = check_evaluate_inputs(cfg)
    ids = load_split(cfg.data, SPLIT)
    split_sequences = ids.size(0)
    if cfg.eval_sequences is not None:
        ids = ids[: cfg.eval_sequences]

    models = _load_models(cfg)
    where = ", ".join(f"{role} {m.placement.describe()}" for role, m in models.items())
    log.info("evaluating %s on %d eval sequences of %d tokens (%s)", ", ".join(models), *ids.shape, where)
    model_metrics, comparisons = _quality(cfg, models, heldout_sums(models, ids, cfg.batch_size))
    speed = _speed(cfg, models, inputs.tokenizer)
    lm_eval_results: dict[str, Any] = {}
    if cfg.lm_eval_tasks:
        lm_eval_results = run_lm_eval(
            models, inputs.tokenizer, cfg.lm_eval_tasks, inputs.task_manager, cfg.lm_eval_limit, cfg.batch_size
        )
    metrics = {
        "format_version": FORMAT_VERSION,
        "models": model_metrics,
        "comparisons": comparisons,
        "speed": speed,
        "lm_eval": lm_eval_results,
        "data": _data_section(cfg, inputs.manifest, ids, split_sequences),
        "config": cfg.model_dump(),
    }
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (out / SUMMARY_FILE).write_text(summary_markdown(metrics))
    log.info("wrote %s", cfg.output)
    return metrics
