"""The promotion gate: move the ``champion`` alias to a registered version only when it is good enough.

The ``promote`` step of a pipeline run and the operator's ``e3prune promote`` / ``e3prune
rollback`` (docs/operations.md, "Promotion and rollback").

Promote (:func:`promote`) and roll back (:func:`rollback`)
    Aliases, never the deprecated stages. ``challenger`` is what ``register``
    (:mod:`e3prune.registry`) produced last; ``champion`` moves only when the gate passes:
    absolute thresholds (perplexity ratio to the teacher, prefill speedup, lm-eval task minimums)
    and, against the current champion of the same source (version tag ``e3prune.source``), a
    perplexity no worse than the champion's, and a speed measurement the evaluate step trusted
    (``metric.speedup.reliable``, docs/method.md, Stage 6). The metrics are the version's ``metric.*`` tags, so
    the gate reads one object whatever run or experiment the version came from. The decision,
    its reasons and a timestamp are written as version tags so the registry UI shows why a
    version is or is not the champion. Every promotion appends to the registered-model tag
    ``e3prune.champion_history`` (a JSON list of versions, the last one the champion), which is
    what ``rollback`` walks back.

A version registered without a decision (``promote`` killed or failed after ``register``) is
what :func:`gate_decision` finds empty: ``detect_release`` reports it as a pending gate, and
:func:`gate_pending` runs the gate alone on it; :func:`promote_command` is the command line an
operator runs instead (docs/operations.md, "When a step fails").

Both first resolve the tracking URI and check the server (:func:`e3prune.tracking.connect`), so a
wrong or down server fails in seconds naming ``mlflow_tracking_uri``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator

from e3prune import tracking
from e3prune.config import PipelineParameter, StepConfig
from e3prune.errors import E3PruneError
from e3prune.registry import CHALLENGER, CHAMPION, METRIC_TAG_PREFIX, SOURCE_TAG, ModelName, require_model_name
from e3prune.report import SPEED_REASON_TAG, SPEED_RELIABLE_METRIC

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from e3prune.detect import Detection

log = logging.getLogger(__name__)

DECISION_TAG = "e3prune.gate.decision"  # promoted | rejected
REASONS_TAG = "e3prune.gate.reasons"  # JSON list of strings
GATE_TIME_TAG = "e3prune.gate.timestamp"  # ISO 8601, UTC
GATE_CHAMPION_TAG = "e3prune.gate.compared_with"  # the champion version the gate compared against
PREVIOUS_CHAMPION_TAG = "e3prune.previous_champion"
ROLLED_BACK_TAG = "e3prune.rolled_back"
HISTORY_TAG = "e3prune.champion_history"  # registered-model tag: JSON list, last = current champion
HISTORY_MAX = 100

# Metrics the gate reads (version tags ``metric.<key>``, written by ``register``).
PERPLEXITY_RATIO_METRIC = "student.perplexity_ratio"  # ppl_student / ppl_teacher
PERPLEXITY_METRIC = "student.perplexity"
SPEEDUP_METRIC = "speedup.prefill"  # teacher prefill time / student prefill time


class PromoteConfig(StepConfig):
    """What ``promote`` takes: which version, and the quality gate it must pass to become champion.

    The metrics are the version's ``metric.*`` tags written by ``register``.
    """

    model_name: ModelName = Field(description="registered model name in the MLflow registry")
    version: str | None = Field(None, description="version to promote (default: the one with alias 'challenger')")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    max_perplexity_ratio: Annotated[float, PipelineParameter("gate_max_perplexity_ratio")] = Field(
        1.5, gt=0, description=f"promotion gate: distilled/teacher perplexity at most this (metric {PERPLEXITY_RATIO_METRIC})"
    )
    min_speedup: Annotated[float, PipelineParameter("gate_min_speedup")] = Field(
        1.0, gt=0, description=f"promotion gate: prefill speedup over the teacher at least this (metric {SPEEDUP_METRIC})"
    )
    lm_eval_min: dict[str, float] = Field(
        default_factory=dict,
        description="metric key -> minimum, e.g. lm_eval.python_stdlib_cloze.student.acc=0.4",
    )
    require_better_than_champion: Annotated[bool, PipelineParameter("gate_require_better_than_champion")] = Field(
        True,
        description=f"promotion gate: the challenger's {PERPLEXITY_METRIC} must not exceed the champion's (same {SOURCE_TAG}) "
        "times champion_tolerance_ratio",
    )
    champion_tolerance_ratio: float = Field(
        1.0, ge=1.0, description="allowed factor over the champion's perplexity (1.0: not worse at all)"
    )

    @field_validator("version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[1-9][0-9]*", v.strip()):
            raise ValueError("must be a version number like 3")
        return v.strip() if v is not None else None

    @field_validator("lm_eval_min")
    @classmethod
    def _lm_eval_min(cls, v: dict[str, float]) -> dict[str, float]:
        for key, minimum in v.items():
            if not key or not math.isfinite(minimum):
                raise ValueError(f"each entry is a metric key and a finite minimum (got {key!r}: {minimum!r})")
        return v


# --------------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class GateCheck:
    """One line of the gate: what was compared, and whether it passed."""

    name: str
    value: float | None
    threshold: str  # e.g. "≤ 1.5"
    passed: bool
    detail: str  # a sentence for the reasons list

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "passed": self.passed,
            "detail": self.detail,
        }


def version_metrics(mv: ModelVersion) -> dict[str, float]:
    """The ``metric.*`` tags of a version as numbers (unparsable ones are left out)."""
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                out[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return out


def _bound_check(name: str, key: str, metrics: Mapping[str, float], bound: float, *, upper: bool, setting: str):
    """``metrics[key] <= bound`` (``upper``) or ``>= bound``; a missing or non-finite value fails."""
    value = metrics.get(key)
    threshold = f"{'≤' if upper else '≥'} {bound:g}"
    if value is None or not math.isfinite(value):
        missing = "missing" if value is None else f"not finite ({value})"
        return GateCheck(name, value, threshold, False, f"{name}: metric {key} is {missing} on the version")
    ok = value <= bound if upper else value >= bound
    rel = ("≤" if ok else ">") if upper else ("≥" if ok else "<")
    return GateCheck(name, value, threshold, ok, f"{name} {value:.4g} {rel} {bound:g} ({setting})")


def _champion_check(cfg: PromoteConfig, challenger: ModelVersion, champion: ModelVersion | None) -> GateCheck:
    """Not worse than the champion — when there is one to compare with.

    Perplexities of different source models (other tokenizers, other data) say nothing about each
    other, so a champion of another source (``e3prune.source``) is not compared; neither is one
    without the metric. Those cases pass, with the reason said.
    """
    name = "perplexity vs champion"
    ppl = version_metrics(challenger).get(PERPLEXITY_METRIC)
    if champion is None:
        return GateCheck(name, ppl, "—", True, f"{name}: no champion yet")
    if champion.version == challenger.version:
        return GateCheck(name, ppl, "—", True, f"{name}: already the champion")
    theirs, ours = (champion.tags or {}).get(SOURCE_TAG), (challenger.tags or {}).get(SOURCE_TAG)
    if theirs != ours:
        detail = f"champion version {champion.version} is of another source ({theirs!r}, this one {ours!r})"
        return GateCheck(name, ppl, "—", True, f"{name}: {detail}; not compared")
    champ_ppl = version_metrics(champion).get(PERPLEXITY_METRIC)
    if champ_ppl is None or not math.isfinite(champ_ppl):
        detail = f"champion version {champion.version} has no {PERPLEXITY_METRIC}"
        return GateCheck(name, ppl, "—", True, f"{name}: {detail}; not compared")
    tolerance = f" × {cfg.champion_tolerance_ratio:g}" if cfg.champion_tolerance_ratio != 1 else ""
    setting = f"champion v{champion.version} {champ_ppl:.4g}{tolerance}"
    limit = champ_ppl * cfg.champion_tolerance_ratio
    return _bound_check(name, PERPLEXITY_METRIC, version_metrics(challenger), limit, upper=True, setting=setting)


def _speed_reliability_check(challenger: ModelVersion) -> GateCheck:
    """The evaluate step trusted its speed measurement (docs/method.md, Stage 6).

    A version without the flag was registered before it was recorded: its speedup is taken as
    it is, with the reason said. A flag of 0 fails, with the evaluate step's reason (version tag
    ``e3prune.speed.unreliable_reason``).
    """
    name = "prefill speedup reliable"
    flag = version_metrics(challenger).get(SPEED_RELIABLE_METRIC)
    if flag is None:
        detail = f"{name}: no metric {SPEED_RELIABLE_METRIC} on the version; not checked"
        return GateCheck(name, None, "= 1", True, detail)
    if flag == 1.0:
        return GateCheck(name, flag, "= 1", True, f"{name}: within the layer bound and the spread limit")
    why = (challenger.tags or {}).get(SPEED_REASON_TAG) or f"metric {SPEED_RELIABLE_METRIC} is {flag:g} on the version"
    return GateCheck(name, flag, "= 1", False, f"prefill speedup unreliable: {why}")


def gate_checks(cfg: PromoteConfig, challenger: ModelVersion, champion: ModelVersion | None) -> list[GateCheck]:
    """The quality gate: absolute thresholds, then the comparison with the champion."""
    m = version_metrics(challenger)
    checks = [
        _bound_check(
            "perplexity ratio to the teacher",
            PERPLEXITY_RATIO_METRIC,
            m,
            cfg.max_perplexity_ratio,
            upper=True,
            setting="max_perplexity_ratio",
        ),
        _bound_check("prefill speedup", SPEEDUP_METRIC, m, cfg.min_speedup, upper=False, setting="min_speedup"),
        _speed_reliability_check(challenger),
    ]
    for key, minimum in sorted(cfg.lm_eval_min.items()):
        checks.append(_bound_check(key, key, m, minimum, upper=False, setting="lm_eval_min"))
    if cfg.require_better_than_champion:
        checks.append(_champion_check(cfg, challenger, champion))
    return checks


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def summary_markdown(
    model_name: str, version: str, promoted: bool, checks: Sequence[GateCheck], previous_champion: str | None
) -> str:
    """The decision as a person reads it (the pipeline's Markdown output and the CLI print it)."""
    decision = "promoted to champion" if promoted else "rejected"
    lines = [
        f"## Promotion gate: {model_name} version {version} — {decision}",
        "",
        "| check | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for c in checks:
        lines.append(f"| {c.name} | {_fmt(c.value)} | {c.threshold} | {'pass' if c.passed else '**fail**'} |")
    lines.append("")
    if promoted:
        before = f"version {previous_champion}" if previous_champion else "none"
        lines.append(f"Champion: {before} → version {version}. `e3prune rollback --model-name {model_name}` undoes it.")
    else:
        lines.append("Champion unchanged" + (f" (version {previous_champion})." if previous_champion else " (none)."))
        lines.extend(f"- {c.detail}" for c in checks if not c.passed)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- aliases and history


def _alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if tracking.error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _history(client: MlflowClient, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    if not raw:
        return []
    try:
        return [str(v) for v in json.loads(raw)]
    except (ValueError, TypeError):
        log.warning("registered model %s: tag %s is not a JSON list; starting a new history", name, HISTORY_TAG)
        return []


def _set_history(client: MlflowClient, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_MAX:]))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- promote and roll back


def promote(cfg: PromoteConfig) -> dict[str, Any]:
    """Run the quality gate on a version and make it ``champion`` if it passes.

    Returns ``promoted``, ``reasons`` (the failed checks when rejected, every check when
    promoted), ``version``, ``previous_champion`` (the champion before this call, or None),
    ``summary_markdown`` and ``checks``. The decision is also written on the version as tags.
    """
    uri = tracking.connect(cfg.tracking_uri)
    name = cfg.model_name
    with tracking.mlflow_session(uri, "promoting") as client:
        challenger = _challenger(client, cfg)
        version = str(challenger.version)
        champion = _alias_version(client, name, CHAMPION)
        previous = str(champion.version) if champion is not None else None
        checks = gate_checks(cfg, challenger, champion)
        promoted = all(c.passed for c in checks)
        reasons = [c.detail for c in checks if promoted or not c.passed]
        _record_decision(client, name, version, promoted, reasons, previous)
        if promoted and previous != version:
            _make_champion(client, name, version, previous)
    log.info("%s version %s: %s", name, version, "promoted" if promoted else "rejected")
    return {
        "promoted": promoted,
        "reasons": reasons,
        "version": version,
        "previous_champion": previous,
        "summary_markdown": summary_markdown(name, version, promoted, checks, previous),
        "checks": [c.as_dict() for c in checks],
    }


def _challenger(client: MlflowClient, cfg: PromoteConfig) -> ModelVersion:
    """The version to judge: ``cfg.version``, else the one with alias ``challenger``."""
    from mlflow.exceptions import MlflowException

    name = cfg.model_name
    if cfg.version is None:
        challenger = _alias_version(client, name, CHALLENGER)
        if challenger is None:
            raise E3PruneError(
                f"registered model {name!r} has no version with alias {CHALLENGER!r} (or does not exist); "
                "register one first or give --version",
                field="version",
            )
        return challenger
    try:
        return client.get_model_version(name, cfg.version)
    except MlflowException as exc:
        if tracking.error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise E3PruneError(f"registered model {name!r} has no version {cfg.version}", field="version") from None


def _record_decision(
    client: MlflowClient, name: str, version: str, promoted: bool, reasons: list[str], previous: str | None
) -> None:
    client.set_model_version_tag(name, version, DECISION_TAG, "promoted" if promoted else "rejected")
    client.set_model_version_tag(name, version, REASONS_TAG, json.dumps(reasons))
    client.set_model_version_tag(name, version, GATE_TIME_TAG, _now())
    if previous is not None:
        client.set_model_version_tag(name, version, GATE_CHAMPION_TAG, previous)


def _make_champion(client: MlflowClient, name: str, version: str, previous: str | None) -> None:
    history = _history(client, name)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)  # the alias was moved by hand: keep it reachable by rollback
    history.append(version)
    _set_history(client, name, history)
    if previous is not None:
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, previous)
    client.set_registered_model_alias(name, CHAMPION, version)


# --------------------------------------------------------------------------- a version left without a decision


def gate_decision(mv: ModelVersion) -> str | None:
    """``promoted`` or ``rejected`` when the gate ran on ``mv``, else None (its gate is pending)."""
    return (mv.tags or {}).get(DECISION_TAG) or None


def promote_command(cfg: PromoteConfig) -> str:
    """The ``e3prune promote`` command line that runs the gate of ``cfg``: settings left at their
    defaults are left out, so a default gate reads ``e3prune promote --model-name N --version V``."""
    words = ["e3prune", "promote", "--model-name", cfg.model_name]
    if cfg.version is not None:
        words += ["--version", cfg.version]
    for name, field in PromoteConfig.model_fields.items():
        value = getattr(cfg, name)
        if name in ("model_name", "version") or value == field.get_default(call_default_factory=True):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            words += [w for key, minimum in sorted(value.items()) for w in (flag, f"{key}={minimum:g}")]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def pending_gate_config(found: Detection) -> PromoteConfig | None:
    """The gate of the version ``detect_release`` found registered without a decision, with the
    run's own thresholds; None when no gate is pending."""
    if not found.pending_gate_version:
        return None
    run = found.run_config
    target = {
        "model_name": run["registered_model_name"],
        "version": found.pending_gate_version,
        "tracking_uri": run.get("mlflow_tracking_uri") or None,
    }
    return PromoteConfig.parse({**found.steps["gate"], **target})


def gate_pending(found: Detection) -> dict[str, Any] | None:
    """Run the gate alone on the version ``found`` reports pending (:func:`promote`'s result), or
    return None when there is none: what a run does instead of compressing the release again."""
    cfg = pending_gate_config(found)
    return None if cfg is None else promote(cfg)


def rollback(model_name: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Give the ``champion`` alias back to the previous champion (the history ``promote`` keeps).

    Versions deleted since they were champion are skipped. Returns ``model_name``, ``champion``
    (the version restored), ``rolled_back`` (the version that lost the alias) and ``history``.
    """
    require_model_name(model_name)
    uri = tracking.connect(tracking_uri)
    with tracking.mlflow_session(uri, "rolling back") as client:
        from mlflow.exceptions import MlflowException

        try:
            history = _history(client, model_name)
        except MlflowException as exc:
            if tracking.error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise E3PruneError(f"registered model {model_name!r} does not exist", field="model_name") from None
        current = _alias_version(client, model_name, CHAMPION)
        if current is None:
            raise E3PruneError(f"registered model {model_name!r} has no champion to roll back", field="model_name")
        current_version = str(current.version)
        if history and history[-1] == current_version:
            history.pop()
        restored = _previous_champion(client, model_name, history)
        if restored is None:
            raise E3PruneError(
                f"registered model {model_name!r}: version {current_version} is the first champion, there is no "
                "previous one to restore (delete the alias by hand to have no champion)",
                field="model_name",
            )
        client.set_registered_model_alias(model_name, CHAMPION, restored)
        client.set_model_version_tag(model_name, current_version, ROLLED_BACK_TAG, _now())
        _set_history(client, model_name, history)
    log.info("%s: champion rolled back from version %s to %s", model_name, current_version, restored)
    return {"model_name": model_name, "champion": restored, "rolled_back": current_version, "history": history}


def _previous_champion(client: MlflowClient, model_name: str, history: list[str]) -> str | None:
    """The last version of ``history`` that still exists; deleted ones are popped off ``history``."""
    from mlflow.exceptions import MlflowException

    while history:
        candidate = history[-1]
        try:
            client.get_model_version(model_name, candidate)
        except MlflowException as exc:
            if tracking.error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("champion history of %s: version %s no longer exists; skipping it", model_name, candidate)
            history.pop()
            continue
        return candidate
    return None
