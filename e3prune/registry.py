"""Tracking and model registry (MLflow): record a run, register the compressed model, gate its promotion.

The last step of a pipeline run (docs/architecture.md, ``register``) and the operator's ``promote`` /
``rollback`` commands live here; nothing else in the library imports MLflow.

Register (:func:`register`)
    One MLflow run per pipeline run, found by the run tag ``e3prune.run_key`` (the KFP job id) or
    created, so a retried ``register`` (after a network failure, a pod eviction) logs into the
    same run and reuses the model version it created before — never a second run or version.
    Params are logged once (MLflow params are immutable; a retry with a *different* value for a
    logged param is an error, since it means two different runs share one key), curves are
    logged with their step numbers (steps already logged are skipped), artifacts are uploaded
    (through the tracking server: with ``mlflow server --artifacts-destination s3://…`` the
    client needs no S3 credentials), then a model version is registered and given the
    ``challenger`` alias.

    The version's ``source`` is the exported model itself (``s3://…``), not a copy in MLflow's
    artifact store: ``MlflowClient.create_model_version(name, source="s3://…", run_id=…)`` is
    accepted by an MLflow 3.17 server as is (its source validation only restricts local paths,
    ``runs:/`` / ``models:/`` / ``mlflow-artifacts:`` URIs and host-addressed schemes such as
    ``http``), so an 8B checkpoint is never copied a second time and serving reads it from where
    the export step put it. MLflow 3's *logged models* (``mlflow.<flavor>.log_model``) would
    wrap the checkpoint in an MLmodel flavor and copy it into the artifact store; the pipeline
    does not need that. A *local* ``model_uri`` is a different matter: a tracking server refuses
    a local path as a version source (it could not read it), so a local directory is uploaded
    into the run's artifacts under ``model/`` and the version points there.

    ``release_tags`` (source, revision, ratio: :func:`e3prune.releases.release_tags`) make a
    release register at most once: two runs racing on it both create a version, then the newer
    one is deleted and its run reuses the older; a later run finds the version and keeps it.

    Every final metric is also written as a version tag ``metric.<key>`` (e.g.
    ``metric.student.perplexity_ratio``): the promotion gate then reads one object, the version,
    whatever run or experiment it came from.

Promote (:func:`promote`) and roll back (:func:`rollback`)
    Aliases, never the deprecated stages. ``challenger`` is what ``register`` produced last;
    ``champion`` moves only when the gate passes: absolute thresholds (perplexity ratio to the
    teacher, prefill speedup, lm-eval task minimums) and, against the current champion of the
    same source (version tag ``e3prune.source``), a perplexity no worse than the champion's. The
    decision, its reasons and a timestamp are written as version tags so the registry UI shows
    why a version is or is not the champion. Every promotion appends to the registered-model tag
    ``e3prune.champion_history`` (a JSON list of versions, the last one the champion), which is
    what ``rollback`` walks back.

Failure behaviour: every entry point first resolves the tracking URI (argument, then
``MLFLOW_TRACKING_URI``) and checks ``<uri>/health``, so a wrong or down server fails in seconds
with an error naming ``mlflow_tracking_uri`` instead of MLflow's default retries (7 retries with
exponential backoff, minutes). MLflow's own HTTP retries are shortened too (unless the user set
them) so that a server that goes away mid-way also fails within about a minute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from e3prune.config import StepConfig
from e3prune.errors import E3PruneError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
TRACKING_URI_FIELD = "mlflow_tracking_uri"
RUN_KEY_TAG = "e3prune.run_key"
SOURCE_TAG = "e3prune.source"  # the source model a version was compressed from (its "family")
METRIC_TAG_PREFIX = "metric."
CHALLENGER = "challenger"
CHAMPION = "champion"
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

# MLflow's log_batch limits (mlflow.utils.validation): 1000 metrics, 100 params per request.
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000

# MLflow's defaults retry a dead server for minutes; these apply unless the user set the variable.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
HEALTH_ATTEMPTS = 3

# Registered-model names: MLflow forbids '/' and ':'; we also keep to characters that need no
# quoting in search filters, URLs and shells.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,249}$")
RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,249}$")
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,254}$")
# What looks like a credential is never sent to MLflow, where every reader of the run sees it.
# Judged by the words of the key (split at '_', '.', '-', camelCase), so that `search_tokens` or
# `author` stay while `hf_token`, `aws_secret_access_key` and `apiKey` go.
SECRET_WORDS = {"secret", "password", "passwd", "token", "apikey", "credential", "credentials", "auth", "authorization"}
SECRET_WORD_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("account", "key")}
SECRET_VALUE_RE = re.compile(
    r"(\b(AKIA|ASIA)[A-Z0-9]{16}\b|\bhf_[A-Za-z0-9]{30,}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bsk-[A-Za-z0-9_\-]{20,}\b"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----|\bBearer\s+\S+)"
)
URI_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@\s:]*):(?P<password>[^/@\s]*)@")


# --------------------------------------------------------------------------- configs


def _check_model_name(v: str) -> str:
    if not MODEL_NAME_RE.match(v):
        raise ValueError(
            "must be 1-250 characters: letters, digits, '_', '.', '-', starting with a letter or digit "
            "(MLflow forbids '/' and ':'; write a hub id like Qwen/Qwen3-8B as Qwen3-8B or Qwen--Qwen3-8B)"
        )
    return v


class RegisterConfig(StepConfig):
    """What ``register`` takes: where the model is, what to call it, and the pipeline run's key."""

    model_name: str = Field(description="registered model name in the MLflow registry")
    model_uri: str = Field(description="the exported model (s3://… or a local directory); the version's source")
    run_key: str = Field(
        description="unique id of the pipeline run (the KFP job id): a rerun reuses its run and version"
    )
    run_name: str = Field("", description="human-readable MLflow run name (default: the run key)")
    experiment: str = Field("e3-pruner", description="MLflow experiment of the run")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    alias: str = Field(CHALLENGER, description="alias given to the new version")
    release_tags: dict[str, str] = Field(
        default_factory=dict,
        description="version tags that name the compressed release (source, revision, ratio): at most one "
        "version per release, so two runs racing on the same release register one version",
    )

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return _check_model_name(v)

    @field_validator("model_uri")
    @classmethod
    def _model_uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be an s3://bucket/prefix URI or a local model directory")
        return v

    @field_validator("run_key")
    @classmethod
    def _run_key(cls, v: str) -> str:
        if not RUN_KEY_RE.match(v):
            raise ValueError("must be 1-250 characters: letters, digits, '_', '.', ':', '-' (a KFP job id is fine)")
        return v

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not v.strip() or len(v) > 500:
            raise ValueError("must be a non-empty experiment name of at most 500 characters")
        return v

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not ALIAS_RE.match(v) or v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError(
                "must be letters, digits, '_' and '-', not 'latest' and not of the form v<N> (MLflow reserves those)"
            )
        if v == CHAMPION:
            raise ValueError("'champion' is set only by `e3prune promote`, through the quality gate")
        return v


class PromoteConfig(StepConfig):
    """What ``promote`` takes: which version, and the quality gate it must pass to become champion.

    The metrics are the version's ``metric.*`` tags written by ``register``.
    """

    model_name: str = Field(description="registered model name in the MLflow registry")
    version: str | None = Field(None, description="version to promote (default: the one with alias 'challenger')")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    max_perplexity_ratio: float = Field(
        1.5, gt=0, description=f"largest allowed student/teacher perplexity ratio (metric {PERPLEXITY_RATIO_METRIC})"
    )
    min_speedup: float = Field(1.0, ge=0, description=f"smallest allowed prefill speedup (metric {SPEEDUP_METRIC})")
    lm_eval_min: dict[str, float] = Field(
        default_factory=dict,
        description="metric key -> minimum, e.g. lm_eval.python_stdlib_cloze.student.acc=0.4",
    )
    require_better_than_champion: bool = Field(
        True,
        description=f"the challenger's {PERPLEXITY_METRIC} must not exceed the champion's (same {SOURCE_TAG}) "
        "times champion_tolerance_ratio",
    )
    champion_tolerance_ratio: float = Field(
        1.0, ge=1.0, description="allowed factor over the champion's perplexity (1.0: not worse at all)"
    )

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return _check_model_name(v)

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


# --------------------------------------------------------------------------- tracking server


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI: the argument, else ``MLFLOW_TRACKING_URI``; neither is a user error."""
    uri = uri or os.environ.get(TRACKING_URI_ENV, "")
    uri = uri.strip()
    if not uri:
        raise E3PruneError(
            f"no MLflow tracking server given: pass tracking_uri (--tracking-uri) or set {TRACKING_URI_ENV}, "
            "e.g. http://mlflow.mlflow.svc:5000 or sqlite:///mlflow.db",
            field=TRACKING_URI_FIELD,
        )
    return uri


def redact(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` URI in it replaced by ``***``."""
    return URI_USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def check_tracking_server(uri: str, timeout_seconds: float = 10) -> None:
    """Fail fast, naming the setting, when an ``http(s)`` tracking server does not answer ``/health``.

    MLflow's client would retry a dead server for minutes before a cryptic ``MaxRetryError``; a
    pipeline step should say in seconds which setting is wrong. A couple of quick retries ride
    out a server that is just restarting. Database and file URIs (``sqlite:``, ``file:``, paths)
    need no server and are not checked.
    """
    import requests

    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme not in ("http", "https"):
        return
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_seconds
    reason = "no answer"
    for attempt in range(HEALTH_ATTEMPTS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            resp = requests.get(url, timeout=max(0.5, min(3.0, remaining)), verify=_tls_verify())
        except requests.RequestException as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            # 401 / 403: a server that wants credentials is up; MLflow's own auth handles that.
            if resp.status_code in (200, 401, 403):
                return
            reason = f"HTTP {resp.status_code} from {url} (is this an MLflow tracking server?)"
        if attempt + 1 < HEALTH_ATTEMPTS:
            time.sleep(min(0.5 * 2**attempt, max(0.0, deadline - time.monotonic())))
    raise E3PruneError(
        f"MLflow tracking server at {redact(uri)} is unreachable: {redact(reason)}; check that the server runs and "
        f"that tracking_uri (--tracking-uri) or {TRACKING_URI_ENV} points at it",
        field=TRACKING_URI_FIELD,
    )


def _tls_verify() -> bool | str:
    """TLS verification as MLflow's client does it, so the check and the client agree."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


@contextlib.contextmanager
def _short_http_retries() -> Iterator[None]:
    """MLflow's HTTP retry settings shortened for the duration (a user's own settings win)."""
    added = [k for k in HTTP_DEFAULTS if k not in os.environ]
    for k in added:
        os.environ[k] = HTTP_DEFAULTS[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _is_connection_failure(exc: BaseException) -> bool:
    import requests

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, requests.RequestException | ConnectionError | TimeoutError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@contextlib.contextmanager
def _mlflow_session(uri: str, action: str) -> Iterator[MlflowClient]:
    """A client for ``uri`` with short retries; a server lost mid-way becomes one clear error."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with _short_http_retries():
        try:
            yield MlflowClient(tracking_uri=uri, registry_uri=uri)
        except MlflowException as exc:
            if not _is_connection_failure(exc):
                raise
            raise E3PruneError(
                f"lost the MLflow tracking server at {redact(uri)} while {action}: {redact(str(exc))[:500]}; "
                "run the step again once the server is back (it resumes where it stopped)",
                field=TRACKING_URI_FIELD,
            ) from exc


def _error_code(exc: BaseException) -> str:
    return getattr(exc, "error_code", "") or ""


# --------------------------------------------------------------------------- what may be logged


def _looks_secret(key: str, value: str) -> bool:
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()) if w]
    if SECRET_WORDS.intersection(words) or SECRET_WORD_PAIRS.intersection(zip(words, words[1:], strict=False)):
        return True
    return bool(SECRET_VALUE_RE.search(value))


def _safe_items(items: Mapping[str, Any], what: str) -> dict[str, str]:
    """Stringified entries with credentials dropped and URI passwords redacted."""
    safe = {}
    for key, value in items.items():
        text = redact(str(value))
        if _looks_secret(str(key), text):
            log.warning("not logging %s %r to MLflow: it looks like a credential", what, key)
            continue
        safe[str(key)] = text
    return safe


def _metric_tag_value(value: float) -> str:
    return repr(float(value))  # full precision: the gate compares these


# --------------------------------------------------------------------------- register


def _experiment_id(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException as exc:  # created by a racing run in between
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise E3PruneError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or choose another name",
            field="experiment",
        )
    return exp.experiment_id


def _find_or_create_run(client: MlflowClient, experiment_id: str, cfg: RegisterConfig):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{cfg.run_key}'",
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    if runs:
        if len(runs) > 1:
            log.warning("%d MLflow runs carry %s=%s; using the oldest", len(runs), RUN_KEY_TAG, cfg.run_key)
        return runs[0]
    return client.create_run(experiment_id, run_name=cfg.run_name or cfg.run_key, tags={RUN_KEY_TAG: cfg.run_key})


def _log_params(client: MlflowClient, run, params: Mapping[str, Any], run_key: str) -> None:
    from mlflow.entities import Param

    logged = run.data.params
    new = []
    for key, value in _safe_items(params, "param").items():
        if len(value) > MAX_PARAM_CHARS:
            log.warning("param %r is %d characters; MLflow keeps %d, truncating", key, len(value), MAX_PARAM_CHARS)
            value = value[: MAX_PARAM_CHARS - 1] + "…"
        if key in logged:
            if logged[key] != value:
                raise E3PruneError(
                    f"param {key!r} was logged as {logged[key]!r} by an earlier attempt with run key {run_key!r}, "
                    f"now {value!r}; MLflow params cannot change: give this run its own run_key",
                    field="params",
                )
            continue
        new.append(Param(key, value))
    for i in range(0, len(new), PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=new[i : i + PARAMS_PER_BATCH])


def _check_metric_key(key: str, field: str) -> None:
    if not key or not re.fullmatch(r"[\w.\-/ ]+", key) or len(key) > 250:
        raise E3PruneError(
            f"metric key {key!r} is not allowed by MLflow: use letters, digits, '_', '-', '.', '/', ' '", field=field
        )


def _log_curves(client: MlflowClient, run_id: str, curves: Mapping[str, Sequence[tuple[int, float]]]) -> None:
    """Each curve as one metric history; steps an earlier attempt already logged are skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch: list[Metric] = []
    for key, points in curves.items():
        done = {m.step for m in client.get_metric_history(run_id, key)}
        for step, value in points:
            if int(step) not in done:
                batch.append(Metric(key, float(value), now, int(step)))
    for i in range(0, len(batch), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + METRICS_PER_BATCH])


def _log_metrics(client: MlflowClient, run, metrics: Mapping[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    logged = run.data.metrics
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if logged.get(k) != float(v)]
    for i in range(0, len(batch), METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=batch[i : i + METRICS_PER_BATCH])


def _log_artifacts(client: MlflowClient, run_id: str, artifacts: Mapping[str, Path]) -> None:
    """``artifacts`` maps the artifact's path in the run (``eval/summary.md``) to a local file or directory."""
    for name, local in artifacts.items():
        if local.is_dir():
            client.log_artifacts(run_id, str(local), name)
            continue
        parent, _, filename = name.rpartition("/")
        if local.name == filename:
            client.log_artifact(run_id, str(local), parent or None)
        else:  # MLflow names the artifact after the local file: stage a copy under the wanted name
            with tempfile.TemporaryDirectory(prefix="e3prune-artifact-") as tmp:
                staged = Path(tmp) / filename
                shutil.copyfile(local, staged)
                client.log_artifact(run_id, str(staged), parent or None)


def _is_local(uri: str) -> bool:
    scheme = urllib.parse.urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter is not a scheme


def _local_path(uri: str) -> Path:
    return Path(urllib.parse.urlparse(uri).path if uri.startswith("file:") else uri)


def _quote(value: str, field: str) -> str:
    """A string literal for an MLflow search filter (no escaping exists: pick the quote it lacks)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise E3PruneError(f"{value!r} holds both quote characters; MLflow search filters cannot express it", field=field)


def _search_versions(client: MlflowClient, model_name: str, tags: Mapping[str, str]) -> list[ModelVersion]:
    parts = [f"name = {_quote(model_name, 'model_name')}"]
    for key, value in tags.items():
        if "`" in key:
            raise E3PruneError(f"tag key {key!r} holds a backtick", field="tags")
        parts.append(f"tags.`{key}` = {_quote(value, 'tags')}")
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(" AND ".join(parts), max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    return sorted(found, key=lambda mv: int(mv.version))


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="Layer-pruned, distilled models written by e3-pruner.")
        except MlflowException as exc2:  # created by a racing run in between
            if _error_code(exc2) != "RESOURCE_ALREADY_EXISTS":
                raise


def _create_version(client: MlflowClient, cfg: RegisterConfig, run_id: str, source: str, tags: dict[str, str]):
    """A new version for ``cfg.run_key``, unless a racing attempt with the same key got there first.

    Two attempts racing on one run key could both find no version and both create one; after
    creating, the lowest version carrying the key wins and a loser deletes its own, so one
    version remains.
    """
    mv = client.create_model_version(cfg.model_name, source, run_id=run_id, tags=tags)
    winner = _first_version(client, cfg)
    if winner is not None and winner.version != mv.version:
        log.warning("version %s lost a race for %s to version %s; deleting it", mv.version, cfg.run_key, winner.version)
        client.delete_model_version(cfg.model_name, mv.version)
        return client.get_model_version(cfg.model_name, winner.version)
    return mv


def _first_version(client: MlflowClient, cfg: RegisterConfig) -> ModelVersion | None:
    """The oldest version of this run key, or of this release (``cfg.release_tags``): the one to keep."""
    found = _search_versions(client, cfg.model_name, {RUN_KEY_TAG: cfg.run_key})
    if cfg.release_tags:
        found += _search_versions(client, cfg.model_name, cfg.release_tags)
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _update_tags(client: MlflowClient, mv: ModelVersion, tags: dict[str, str]) -> ModelVersion:
    """An earlier attempt's version with its tags brought up to date (it may have stopped half-way)."""
    changed = False
    for key, value in tags.items():
        if mv.tags.get(key) != value:
            client.set_model_version_tag(mv.name, mv.version, key, value)
            changed = True
    return client.get_model_version(mv.name, mv.version) if changed else mv


def register(
    cfg: RegisterConfig,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    artifacts: Mapping[str, str | Path] | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Log a pipeline run to MLflow and register its model as a version with alias ``cfg.alias``.

    ``params`` become run params (strings; what looks like a credential is dropped),
    ``curves`` metric histories (``{"distill/loss": [(step, value), …]}``), ``metrics`` the final
    metrics (``{"student.perplexity": 41.2}``; also version tags ``metric.<key>``), ``artifacts``
    files in the run (``{"eval/summary.md": "/tmp/summary.md"}``), ``tags`` version tags (pass
    ``e3prune.source`` for the promotion gate's champion comparison). Rerunning with the same
    ``run_key`` reuses the run and the version. Returns ``tracking_uri``, ``experiment_id``,
    ``run_id``, ``model_name``, ``version``, ``alias``, ``model_uri`` (the version's source).
    """
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_server(uri)
    params, metrics, curves, tags = dict(params or {}), dict(metrics or {}), dict(curves or {}), dict(tags or {})

    # Everything a user can get wrong is checked before the first write.
    local_artifacts = {}
    for name, path in (artifacts or {}).items():
        name = str(name).strip("/")
        if not name or ".." in name.split("/"):
            raise E3PruneError(
                f"artifact name {name!r} must be a relative path like eval/summary.md", field="artifacts"
            )
        local = Path(path)
        if not local.exists():
            raise E3PruneError(f"artifact {name!r}: {local} does not exist", field="artifacts")
        local_artifacts[name] = local
    for key in metrics:
        _check_metric_key(key, "metrics")
    for key in curves:
        _check_metric_key(key, "curves")
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise E3PruneError(f"metric {key!r} must be a number, got {value!r}", field="metrics")
    local_model = _is_local(cfg.model_uri)
    if local_model and not _local_path(cfg.model_uri).is_dir():
        raise E3PruneError(
            f"{cfg.model_uri} is not a directory; give the exported model's directory or its s3:// URI",
            field="model_uri",
        )
    version_tags = _safe_items(tags, "tag")
    version_tags.update({f"{METRIC_TAG_PREFIX}{k}": _metric_tag_value(v) for k, v in metrics.items()})
    version_tags[RUN_KEY_TAG] = cfg.run_key
    version_tags.update(cfg.release_tags)

    with _mlflow_session(uri, "registering the model") as client:
        experiment_id = _experiment_id(client, cfg.experiment)
        run = _find_or_create_run(client, experiment_id, cfg)
        run_id = run.info.run_id
        _log_params(client, run, params, cfg.run_key)
        _log_curves(client, run_id, curves)
        _log_metrics(client, run, metrics)
        _log_artifacts(client, run_id, local_artifacts)
        _ensure_registered_model(client, cfg.model_name)
        existing = _first_version(client, cfg)
        if existing is not None and existing.tags.get(RUN_KEY_TAG) != cfg.run_key:
            # Another run registered this release first: keep its version, record ours in the run only.
            log.warning(
                "%s is registered already as version %s; not registering it twice", cfg.release_tags, existing.version
            )
            mv = existing
        elif existing is not None:
            mv = _update_tags(client, existing, version_tags)
        else:
            source = cfg.model_uri
            if local_model:
                # A server cannot read the client's disk: the directory goes into the run's artifacts.
                client.log_artifacts(run_id, str(_local_path(cfg.model_uri)), "model")
                source = f"{run.info.artifact_uri.rstrip('/')}/model"
            mv = _create_version(client, cfg, run_id, source, version_tags)
        duplicate = mv.tags.get(RUN_KEY_TAG) != cfg.run_key
        if not duplicate:  # the alias is this run's to set; a release registered by another run keeps its own
            client.set_registered_model_alias(cfg.model_name, cfg.alias, mv.version)
        client.set_terminated(run_id, "FINISHED")
    log.info("registered %s version %s (alias %s) from run %s", cfg.model_name, mv.version, cfg.alias, run_id)
    return {
        "tracking_uri": redact(uri),
        "experiment_id": experiment_id,
        "run_id": run_id,
        "model_name": cfg.model_name,
        "version": str(mv.version),
        "alias": cfg.alias,
        "model_uri": mv.source,
        "duplicate_of_release": duplicate,
    }


def find_versions(model_name: str, tags: Mapping[str, str], tracking_uri: str | None = None) -> list[ModelVersion]:
    """Versions of ``model_name`` whose tags equal ``tags`` (all of them), oldest first.

    The question a recurring run asks before compressing: "was this source revision already
    done?" — e.g. ``find_versions(name, {"e3prune.source_revision": sha})``. A model that does
    not exist has no versions.
    """
    _check_model_name_arg(model_name)
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    with _mlflow_session(uri, "searching model versions") as client:
        return _search_versions(client, model_name, dict(tags))


def _check_model_name_arg(name: str) -> None:
    try:
        _check_model_name(name)
    except ValueError as exc:
        raise E3PruneError(f"{exc} (got {name!r})", field="model_name") from None


# --------------------------------------------------------------------------- promotion gate


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


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


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
    ]
    for key, minimum in sorted(cfg.lm_eval_min.items()):
        checks.append(_bound_check(key, key, m, minimum, upper=False, setting="lm_eval_min"))
    if cfg.require_better_than_champion:
        checks.append(_champion_check(cfg, challenger, champion))
    return checks


def _alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
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


def promote(cfg: PromoteConfig) -> dict[str, Any]:
    """Run the quality gate on a version and make it ``champion`` if it passes.

    Returns ``promoted``, ``reasons`` (the failed checks when rejected, every check when
    promoted), ``version``, ``previous_champion`` (the champion before this call, or None),
    ``summary_markdown`` and ``checks``. The decision is also written on the version as tags.
    """
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_server(uri)
    name = cfg.model_name
    with _mlflow_session(uri, "promoting") as client:
        from mlflow.exceptions import MlflowException

        if cfg.version is None:
            challenger = _alias_version(client, name, CHALLENGER)
            if challenger is None:
                raise E3PruneError(
                    f"registered model {name!r} has no version with alias {CHALLENGER!r} (or does not exist); "
                    "register one first or give --version",
                    field="version",
                )
        else:
            try:
                challenger = client.get_model_version(name, cfg.version)
            except MlflowException as exc:
                if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise E3PruneError(f"registered model {name!r} has no version {cfg.version}", field="version") from None
        version = str(challenger.version)
        champion = _alias_version(client, name, CHAMPION)
        previous = str(champion.version) if champion is not None else None
        checks = gate_checks(cfg, challenger, champion)
        promoted = all(c.passed for c in checks)
        reasons = [c.detail for c in checks if promoted or not c.passed]

        client.set_model_version_tag(name, version, DECISION_TAG, "promoted" if promoted else "rejected")
        client.set_model_version_tag(name, version, REASONS_TAG, json.dumps(reasons))
        client.set_model_version_tag(name, version, GATE_TIME_TAG, _now())
        if previous is not None:
            client.set_model_version_tag(name, version, GATE_CHAMPION_TAG, previous)
        if promoted and previous != version:
            history = _history(client, name)
            if previous is not None and (not history or history[-1] != previous):
                history.append(previous)  # the alias was moved by hand: keep it reachable by rollback
            history.append(version)
            _set_history(client, name, history)
            if previous is not None:
                client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, previous)
            client.set_registered_model_alias(name, CHAMPION, version)
    summary = summary_markdown(name, version, promoted, checks, previous)
    log.info("%s version %s: %s", name, version, "promoted" if promoted else "rejected")
    return {
        "promoted": promoted,
        "reasons": reasons,
        "version": version,
        "previous_champion": previous,
        "summary_markdown": summary,
        "checks": [c.as_dict() for c in checks],
    }


def rollback(model_name: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Give the ``champion`` alias back to the previous champion (the history ``promote`` keeps).

    Versions deleted since they were champion are skipped. Returns ``model_name``, ``champion``
    (the version restored), ``rolled_back`` (the version that lost the alias) and ``history``.
    """
    _check_model_name_arg(model_name)
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    with _mlflow_session(uri, "rolling back") as client:
        from mlflow.exceptions import MlflowException

        try:
            history = _history(client, model_name)
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise E3PruneError(f"registered model {model_name!r} does not exist", field="model_name") from None
        current = _alias_version(client, model_name, CHAMPION)
        if current is None:
            raise E3PruneError(f"registered model {model_name!r} has no champion to roll back", field="model_name")
        current_version = str(current.version)
        if history and history[-1] == current_version:
            history.pop()
        restored = None
        while history:
            candidate = history[-1]
            try:
                client.get_model_version(model_name, candidate)
            except MlflowException as exc:
                if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("champion history of %s: version %s no longer exists; skipping it", model_name, candidate)
                history.pop()
                continue
            restored = candidate
            break
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
