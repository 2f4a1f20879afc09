"""Evaluation of teacher, pruned and distilled models (docs/method.md, Stage 6).

For every model given — the teacher (the original), ``pruned`` (the hardened checkpoint before
recovery) and ``student`` (the distilled checkpoint), at least one of the last two — on the eval
split of the sample step's data:

- held-out perplexity, exp(Σ CE / N) over all N = sequences × (seq_len − 1) next-token positions
  (token-weighted, so every position counts once whatever the batching);
- layers and parameter counts (:func:`e3prune.model_io.describe`);
- against the teacher, over all sequences × seq_len positions (a distribution exists at every
  position, the last included): top-1 agreement, the share of positions where both argmaxes are
  equal, and the mean KL(teacher ‖ model) over the *full* vocabulary,
  KL_t = Σ_v p_T(v) · (log p_T(v) − log p_S(v)), from both models' logits batch by batch
  (not the top-K cache of Stage 1, which sees only K ids and a tail);
- the perplexity ratio to the teacher, and the fraction of the pruned → teacher perplexity gap
  that a model closes, (ppl_pruned − ppl_model) / (ppl_pruned − ppl_teacher): 0 for the pruned
  model itself, 1 for a student as good as the teacher, null without a pruned model or a gap;
- prefill and decode throughput of the teacher and the student (the pruned model when there is
  no student), measured in this process as ``benchmarks/speed.py`` does: prefill is a timed
  forward over a batch without cache, decode a timed greedy ``generate`` with the KV cache minus
  the prefill of its prompt; the models take turns (teacher, student, teacher, ...) so that drifts
  of a shared machine hit both alike; medians;
- optionally, lm-evaluation-harness tasks on the in-memory models (``pip install
  'e3-pruner[eval]'``), e.g. ``python_stdlib_cloze``, the task shipped in ``e3prune/lm_eval_tasks``.

Memory: the models are loaded together (a model given twice is loaded once), in eval mode on the
GPU when there is one. Beside the weights, a batch holds a few fp32 tensors of B × S × V (two
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
                          "prefill_seconds": float, "decode_seconds": float}},   # medians
        "speedup": {role: {"prefill": float, "decode": float}}   # teacher time / model time
      },
      "lm_eval": {task: {role: {metric: float | null, "samples": int}}},   # {} without tasks
      "data": {"uri": str, "split": "eval", "seq_len": int, "sequences": int, "split_sequences": int,
               "tokens": int, "scored_tokens": int, "tokenizer_fingerprint": str, "seed": int | null},
      "config": {...}                    # the EvaluateConfig as given, defaults filled in
    }

``summary.md`` — a Markdown table for a person (the Kubeflow UI shows it): one row per model with
layers, parameters, held-out perplexity, perplexity ratio, top-1 agreement, KL, prefill and
decode tokens/s and the lm-eval scores, then the share of the perplexity gap the student closes
and its speedup.

Entry points: :func:`evaluate` (returns the metrics dict) and ``e3prune evaluate`` (prints the table).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from tqdm.auto import tqdm

from e3prune import storage
from e3prune.model_io import describe, load_causal_lm, load_config, load_tokenizer
from e3prune.config import StepConfig
from e3prune.data import load_split, read_manifest, tokenizer_fingerprint
from e3prune.errors import E3PruneError
from e3prune.losses import next_token_ce
from e3prune.reference import default_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLIT = "eval"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
ROLES = ("teacher", "pruned", "student")
COMPARED = ("pruned", "student")
# lm-eval's stderr of a mean is closed-form; bootstrapping is for other aggregations, where the
# default 100 000 resamples cost more than a small evaluation itself.
LM_EVAL_BOOTSTRAP_ITERS = 1000


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
    batch_size: int = Field(8, ge=1, le=4096, description="sequences per forward pass; also lm-eval's batch size")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype: auto keeps each checkpoint's own"
    )
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


# --------------------------------------------------------------------------- the math


def full_vocab_kl(teacher_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher ‖ model) over the whole vocabulary: (B, S) fp32.

    KL_t = Σ_v p_T(v) · (log p_T(v) − log p_S(v)), both from log-softmax in fp32, with 0 · log 0 = 0:
    a vocabulary entry the teacher masks to −inf (padding rows, say) would otherwise give
    0 · (−inf) = NaN.
    """
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = torch.log_softmax(model_logits.float(), dim=-1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p.isneginf(), torch.zeros_like(terms), terms).sum(-1)


def top1_agreement(teacher_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-position 1.0 where both models' argmax token is the same, else 0.0: (B, S)."""
    return (teacher_logits.argmax(-1) == model_logits.argmax(-1)).float()


def gap_closed(ppl_teacher: float, ppl_pruned: float | None, ppl_model: float) -> float | None:
    """(ppl_pruned − ppl_model) / (ppl_pruned − ppl_teacher): the share of the pruning's
    perplexity loss that ``model`` recovers. None without a pruned model or when pruning lost
    nothing (the share of a zero gap means nothing)."""
    if ppl_pruned is None or ppl_pruned == ppl_teacher:
        return None
    return (ppl_pruned - ppl_model) / (ppl_pruned - ppl_teacher)


@dataclass(frozen=True)
class HeldOut:
    """Sums over the eval split, per role; the metrics are ratios of these."""

    ce_sum: dict[str, float]  # Σ next-token CE, nats
    scored: int  # next-token positions: sequences × (seq_len − 1)
    agree_sum: dict[str, float]  # Σ top-1 agreement, compared roles only
    kl_sum: dict[str, float]  # Σ KL(teacher ‖ model), compared roles only
    positions: int  # positions compared: sequences × seq_len


def heldout_sums(models: Mapping[str, torch.nn.Module], ids: torch.Tensor, batch_size: int) -> HeldOut:
    """One pass over ``ids`` (N, S): the teacher's logits once a batch, each other model's against them.

    ``models`` holds ``teacher`` and any of ``pruned`` / ``student`` (possibly the same object).
    """
    device = next(models["teacher"].parameters()).device
    others = [r for r in COMPARED if r in models]
    ce = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(others, 0.0)
    kl = dict.fromkeys(others, 0.0)
    bar = tqdm(total=ids.size(0), desc="held-out perplexity and agreement", unit="seq")
    with torch.no_grad():
        for start in range(0, ids.size(0), batch_size):
            batch = ids[start : start + batch_size].to(device)
            t_logits = models["teacher"](input_ids=batch, use_cache=False).logits.float()
            ce["teacher"] += next_token_ce(t_logits, batch).double().sum().item()
            for role in others:
                logits = models[role](input_ids=batch, use_cache=False).logits.float()
                ce[role] += next_token_ce(logits, batch).double().sum().item()
                agree[role] += top1_agreement(t_logits, logits).double().sum().item()
                kl[role] += full_vocab_kl(t_logits, logits).double().sum().item()
                del logits
            bar.update(batch.size(0))
    bar.close()
    n, s = ids.shape
    return HeldOut(ce, n * (s - 1), agree, kl, n * s)


# --------------------------------------------------------------------------- speed


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the clock stops before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_seconds(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Seconds of one forward over ``batch`` without a KV cache."""
    with torch.no_grad():
        _sync(batch.device)
        t = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        _sync(batch.device)
        return time.perf_counter() - t


def decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> float:
    """Seconds of ``new_tokens`` greedy steps with the KV cache, the prompt's prefill subtracted.

    Generating 1 token costs the prefill (and one sampling step); generating ``new_tokens + 1``
    costs the prefill and ``new_tokens`` decode steps more. The difference is the decode.
    """
    mask = torch.ones_like(prompt)
    kwargs = {"attention_mask": mask, "do_sample": False, "pad_token_id": pad_token_id}
    with torch.no_grad():
        _sync(prompt.device)
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
        _sync(prompt.device)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kwargs)
        _sync(prompt.device)
        return time.perf_counter() - t - t_first


def measure_speed(models: Mapping[str, torch.nn.Module], cfg: EvaluateConfig, pad_token_id: int) -> dict[str, Any]:
    """Median prefill and decode throughput of ``models`` (teacher first), interleaved run by run.

    Random token ids: the time of a dense forward does not depend on their values.
    """
    teacher = models["teacher"]
    device = next(teacher.parameters()).device
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    prefill = torch.randint(0, vocab, (cfg.prefill_batch, cfg.prefill_len), generator=gen).to(device)
    prompt = torch.randint(0, vocab, (cfg.decode_batch, cfg.decode_prompt), generator=gen).to(device)
    for m in models.values():  # warm-up: allocator, kernels, lazy initialisation
        prefill_seconds(m, prefill[:2])
        decode_seconds(m, prompt, min(4, cfg.decode_tokens), pad_token_id)
    times: dict[str, dict[str, list[float]]] = {r: {"prefill": [], "decode": []} for r in models}
    for _ in tqdm(range(cfg.speed_repeats), desc="speed (interleaved)", unit="round"):
        for role, m in models.items():
            times[role]["prefill"].append(prefill_seconds(m, prefill))
            times[role]["decode"].append(decode_seconds(m, prompt, cfg.decode_tokens, pad_token_id))
    med = {r: {k: statistics.median(v) for k, v in t.items()} for r, t in times.items()}
    prefill_tokens = cfg.prefill_batch * cfg.prefill_len
    decode_tokens = cfg.decode_batch * cfg.decode_tokens
    return {
        "device": _device_name(device),
        "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "repeats": cfg.speed_repeats,
        "prefill": {"batch": cfg.prefill_batch, "length": cfg.prefill_len},
        "decode": {"batch": cfg.decode_batch, "prompt": cfg.decode_prompt, "new_tokens": cfg.decode_tokens},
        "models": {
            r: {
                "prefill_tokens_per_second": prefill_tokens / med[r]["prefill"],
                "decode_tokens_per_second": decode_tokens / med[r]["decode"],
                "prefill_seconds": med[r]["prefill"],
                "decode_seconds": med[r]["decode"],
            }
            for r in models
        },
        "speedup": {
            r: {phase: med["teacher"][phase] / med[r][phase] for phase in ("prefill", "decode")}
            for r in models
            if r != "teacher"
        },
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# --------------------------------------------------------------------------- lm-evaluation-harness


def _task_manager(tasks: Sequence[str]):
    """lm-eval's TaskManager with the shipped tasks on its include path.

    lm-eval's own ~15 000 task configs are indexed only when a task outside the shipped ones is
    asked for: indexing them takes seconds, the shipped directory milliseconds.
    """
    from lm_eval.tasks import TaskManager

    from e3prune.lm_eval_tasks import SHIPPED_TASKS, TASK_DIR

    defaults = any(t not in SHIPPED_TASKS for t in tasks)
    return TaskManager(include_path=str(TASK_DIR), include_defaults=defaults)


def check_lm_eval_tasks(tasks: Sequence[str]):
    """The TaskManager that knows every task in ``tasks``, or an error that lists what there is."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise E3PruneError(
            "lm-evaluation-harness is not installed; install it with pip install 'e3-pruner[eval]' "
            "or leave lm_eval_tasks empty",
            field="lm_eval_tasks",
        ) from None
    from e3prune.lm_eval_tasks import SHIPPED_TASKS

    manager = _task_manager(tasks)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, sorted(known), n=3)
            if close:
                hints.append(f"{t!r}: did you mean {', '.join(close)}?")
        raise E3PruneError(
            f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}. Shipped with e3prune: "
            f"{', '.join(SHIPPED_TASKS)}; lm-eval's own tasks (groups and tags included, "
            f"{len(known) - len(SHIPPED_TASKS):,}) are listed by `lm-eval ls tasks`."
            + (" " + " ".join(hints) if hints else ""),
            field="lm_eval_tasks",
        )
    return manager


def run_lm_eval(
    models: Mapping[str, torch.nn.Module],
    tokenizer: Any,
    tasks: Sequence[str],
    task_manager: Any,
    limit: int | None,
    batch_size: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {role: {metric: value, "samples": n}}}`` from lm-eval's Python API on loaded models.

    Metric names drop lm-eval's ``,none`` filter suffix (other filters keep theirs); a stderr that
    lm-eval could not compute ("N/A") is null.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for role, model in models.items():
        log.info("lm-eval %s on the %s model", ", ".join(tasks), role)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=task_manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=LM_EVAL_BOOTSTRAP_ITERS,
        )
        for task, entry in results["results"].items():
            metrics: dict[str, Any] = {}
            for key, value in entry.items():
                name, sep, filt = key.partition(",")
                if not sep:
                    continue  # alias, name, sample_len: labels, not metrics
                metrics[name if filt == "none" else key] = float(value) if isinstance(value, int | float) else None
            samples = results.get("n-samples", {}).get(task, {}).get("effective")
            metrics["samples"] = int(samples) if samples is not None else None
            out.setdefault(task, {})[role] = metrics
    return out


# --------------------------------------------------------------------------- validation


@dataclass
class EvaluateInputs:
    tokenizer: Any  # the teacher's (every model's is the same, checked)
    manifest: dict[str, Any]
    task_manager: Any  # lm-eval TaskManager, None without tasks


def check_evaluate_inputs(cfg: EvaluateConfig) -> EvaluateInputs:
    """Everything that can be checked before loading weights; raises :class:`E3PruneError`."""
    configs = {role: load_config(path, field=role) for role, path in cfg.paths().items()}
    manifest = read_manifest(cfg.data)
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

    split = manifest["splits"].get(SPLIT)
    if not split or split.get("sequences", 0) == 0:
        raise E3PruneError(
            f"{cfg.data} has no {SPLIT!r} sequences (its eval budget was 0?); sample it with --eval-tokens > 0",
            field="data",
        )
    seq_len = manifest["seq_len"]
    for role, config in configs.items():
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and seq_len > positions:
            raise E3PruneError(
                f"the eval sequences have {seq_len} tokens, the {role} model only {positions} positions; "
                f"sample the data with seq_len ≤ {positions}",
                field="data",
            )
        if cfg.speed and positions is not None:
            if cfg.prefill_len > positions:
                raise E3PruneError(
                    f"{cfg.prefill_len} tokens exceed the {role} model's {positions} positions", field="prefill_len"
                )
            if cfg.decode_prompt + cfg.decode_tokens + 1 > positions:
                raise E3PruneError(
                    f"a {cfg.decode_prompt}-token prompt plus {cfg.decode_tokens + 1} generated tokens exceed the "
                    f"{role} model's {positions} positions; lower decode_prompt or decode_tokens",
                    field="decode_tokens",
                )
    task_manager = check_lm_eval_tasks(cfg.lm_eval_tasks) if cfg.lm_eval_tasks else None
    storage.check_output(cfg.output, cfg.overwrite)
    return EvaluateInputs(tokenizer, manifest, task_manager)


# --------------------------------------------------------------------------- the step


def _load_models(cfg: EvaluateConfig, device: torch.device) -> dict[str, torch.nn.Module]:
    """Every role's model in eval mode on ``device``; a directory given twice is loaded once."""
    by_path: dict[Path, torch.nn.Module] = {}
    models = {}
    for role, path in cfg.paths().items():
        key = Path(path).resolve()
        if key not in by_path:
            by_path[key] = load_causal_lm(path, cfg.dtype, field=role).to(device).eval()
        models[role] = by_path[key]
    return models


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """The step: validate, measure, write ``metrics.json`` and ``summary.md``; return the metrics."""
    inputs = check_evaluate_inputs(cfg)
    manifest = inputs.manifest
    ids = load_split(cfg.data, SPLIT)
    split_sequences = ids.size(0)
    if cfg.eval_sequences is not None:
        ids = ids[: cfg.eval_sequences]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = _load_models(cfg, device)
    log.info("evaluating %s on %d eval sequences of %d tokens (%s)", ", ".join(models), *ids.shape, device)

    sums = heldout_sums(models, ids, cfg.batch_size)
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

    speed = None
    if cfg.speed:
        timed_role = "student" if "student" in models else "pruned"
        tok = inputs.tokenizer
        pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        speed = measure_speed({"teacher": models["teacher"], timed_role: models[timed_role]}, cfg, pad)

    lm_eval_results: dict[str, Any] = {}
    if cfg.lm_eval_tasks:
        lm_eval_results = run_lm_eval(
            models, inputs.tokenizer, cfg.lm_eval_tasks, inputs.task_manager, cfg.lm_eval_limit, cfg.batch_size
        )

    n, seq_len = ids.shape
    metrics = {
        "format_version": FORMAT_VERSION,
        "models": model_metrics,
        "comparisons": comparisons,
        "speed": speed,
        "lm_eval": lm_eval_results,
        "data": {
            "uri": cfg.data,
            "split": SPLIT,
            "seq_len": seq_len,
            "sequences": n,
            "split_sequences": split_sequences,
            "tokens": n * seq_len,
            "scored_tokens": sums.scored,
            "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
            "seed": manifest.get("seed"),
        },
        "config": cfg.model_dump(),
    }
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (out / SUMMARY_FILE).write_text(summary_markdown(metrics))
    log.info("wrote %s", cfg.output)
    return metrics


# --------------------------------------------------------------------------- the summary


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def summary_markdown(metrics: Mapping[str, Any]) -> str:
    """The table a person reads: one row per model, then the recovered gap and the speedup."""
    models, comparisons, speed = metrics["models"], metrics["comparisons"], metrics["speed"]
    lm_columns = [
        (task, name)
        for task, by_role in metrics["lm_eval"].items()
        for name in sorted({k for scores in by_role.values() for k in scores})
        if name != "samples" and not name.endswith("_stderr") and "_stderr," not in name
    ]
    header = [
        "model",
        "layers",
        "parameters",
        "held-out ppl",
        "ppl ratio",
        "top-1 agreement",
        "KL (nats/token)",
        "prefill tok/s",
        "decode tok/s",
        *(f"{task} {name}" for task, name in lm_columns),
    ]
    rows = []
    for role in ROLES:
        m = models[role]
        if m is None:
            continue
        c = comparisons.get(role) or {}
        s = (speed or {}).get("models", {}).get(role, {})
        scores = [metrics["lm_eval"][task].get(role, {}).get(name) for task, name in lm_columns]
        rows.append(
            [
                role,
                str(m["layers"]),
                _count(m["parameters"]["total"]),
                f"{m['perplexity']:.3f}",
                "1.000" if role == "teacher" else _num(c.get("perplexity_ratio"), ".3f"),
                _num(c.get("top1_agreement"), ".3f"),
                _num(c.get("kl"), ".4f"),
                _num(s.get("prefill_tokens_per_second"), ",.0f"),
                _num(s.get("decode_tokens_per_second"), ",.0f"),
                *(_num(v, ".3f") for v in scores),
            ]
        )
    data = metrics["data"]
    lines = [
        "# Evaluation: teacher, pruned and distilled models",
        "",
        f"Held-out data: {data['sequences']:,} sequences × {data['seq_len']} tokens of the eval split of "
        f"`{data['uri']}` ({data['scored_tokens']:,} next-token positions). Top-1 agreement and KL are "
        "against the teacher, over the full vocabulary.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        _gap_line(models, comparisons),
    ]
    if speed is not None:
        for role, up in speed["speedup"].items():
            lines.append(
                f"The {role} runs {up['prefill']:.2f}× the teacher's prefill and {up['decode']:.2f}× its decode "
                f"throughput ({speed['device']}, {speed['dtype']}, median of {speed['repeats']} interleaved runs; "
                f"prefill {speed['prefill']['batch']} × {speed['prefill']['length']} tokens without cache, decode "
                f"{speed['decode']['batch']} × {speed['decode']['new_tokens']} greedy tokens with the KV cache after "
                f"a {speed['decode']['prompt']}-token prompt)."
            )
    if metrics["lm_eval"]:
        limit = metrics["config"].get("lm_eval_limit")
        samples = {
            task: next((s.get("samples") for s in by_role.values() if s.get("samples") is not None), None)
            for task, by_role in metrics["lm_eval"].items()
        }
        lines.append(
            "lm-eval: "
            + ", ".join(f"{task} on {n} items" if n is not None else task for task, n in samples.items())
            + (f" (limited to {limit} per task)" if limit else "")
            + "."
        )
    return "\n".join(lines) + "\n"


def _gap_line(models: Mapping[str, Any], comparisons: Mapping[str, Any]) -> str:
    student = comparisons.get("student")
    if models.get("student") is None:
        return "No student was given, so no recovered share of the perplexity gap is reported."
    if models.get("pruned") is None:
        return "No pruned model was given, so the student's share of the recovered perplexity gap is not defined."
    ppl = {r: models[r]["perplexity"] for r in ROLES}
    if student["gap_closed"] is None:
        return f"The pruned model's perplexity equals the teacher's ({ppl['teacher']:.3f}): there is no gap to close."
    return (
        f"The student closes {100 * student['gap_closed']:.1f} % of the pruned-vs-teacher perplexity gap "
        f"(pruned {ppl['pruned']:.3f} → student {ppl['student']:.3f}; teacher {ppl['teacher']:.3f})."
    )
