"""Connecting to MLflow and logging a pipeline run into it.

The registry, the promotion gate and release detection talk to MLflow only through
:func:`mlflow_session`, after :func:`connect` has resolved the tracking URI (argument, then
``MLFLOW_TRACKING_URI``; one that carries credentials is refused by :func:`check_tracking_uri`,
as MLflow reads them from ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` or ``_TOKEN``) and checked
``<uri>/health``: a wrong or down server fails in seconds
naming ``mlflow_tracking_uri``, not after MLflow's default retries (minutes); MLflow's own HTTP
retries are shortened too (unless the user set them), so a server lost mid-way fails within
about a minute. One MLflow run per pipeline run, found again by its tag ``e3prune.run_key`` (the
KFP job id), so a retried step logs into the same run: params once (immutable: a *different*
value under the same key is an error), curves by step (steps logged already are skipped),
artifacts through the tracking server (``--artifacts-destination s3://…``: the client needs no S3
credentials); what looks like a credential is never logged. The exported checkpoint is the run's
MLflow 3 *logged model* (:func:`logged_model`), *external* when it lives in S3 (its weights stay
where export wrote them; MLflow holds a small ``MLmodel`` file), with the final metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e3prune.errors import E3PruneError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel, Run

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
TRACKING_URI_FIELD = "mlflow_tracking_uri"
RUN_KEY_TAG = "e3prune.run_key"
MODEL_URI_TAG = "e3prune.model_uri"  # logged-model tag: where the checkpoint is
MODEL_TYPE = "e3prune-layer-pruned-llm"

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
# The authority of a ``scheme://authority/…`` URI, for finding a ``user[:password]@`` in it.
URI_AUTHORITY_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<authority>[^/?#]*)")
CREDENTIAL_ENV = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"


# --------------------------------------------------------------------------- the tracking server


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI: the argument, else ``MLFLOW_TRACKING_URI``; neither, or credentials in it, is a user error."""
    uri = uri or os.environ.get(TRACKING_URI_ENV, "")
    uri = uri.strip()
    if not uri:
        raise E3PruneError(
            f"no MLflow tracking server given: pass tracking_uri (--tracking-uri) or set {TRACKING_URI_ENV}, "
            "e.g. http://mlflow.mlflow.svc:5000 or sqlite:///mlflow.db",
            field=TRACKING_URI_FIELD,
        )
    try:
        return check_tracking_uri(uri)
    except ValueError as exc:
        raise E3PruneError(str(exc), field=TRACKING_URI_FIELD) from None


def check_tracking_uri(uri: str) -> str:
    """``uri``, unless it carries credentials (``ValueError``, the URI shown without them).

    A tracking URI is a parameter: it reaches KFP's inputs and logs, the run's MLflow record and
    summaries, where every reader would see a password in it. MLflow reads credentials from the
    environment instead (docs/operations.md, "Credentials and endpoints").
    """
    found = uri_credentials(uri)
    if found:
        raise ValueError(
            f"credentials do not belong in the tracking URI (it holds {found}; got {without_credentials(uri)}): "
            f"give the URI without them and set {CREDENTIAL_ENV} in the environment (in a cluster: keys of the "
            "Secret e3-pruner-s3); MLflow sends them to the server itself"
        )
    return uri


def uri_credentials(uri: str) -> str:
    """What in ``uri`` is a credential, in words (``"a user name and password"``), or ``""``."""
    m = URI_AUTHORITY_RE.match(uri.strip())
    if m and "@" in m["authority"]:
        userinfo = m["authority"].rpartition("@")[0]
        return "a user name and password" if ":" in userinfo else "a user name"
    query = uri.partition("?")[2].partition("#")[0]
    keys = [k for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if looks_secret(k, v)]
    if keys:
        return f"the query parameter {SECRET_VALUE_RE.sub('***', keys[0])!r}"
    return "a value shaped like a token" if SECRET_VALUE_RE.search(uri) else ""


def without_credentials(uri: str) -> str:
    """``uri`` for a message: no user info, no query, no token-shaped value."""

    def host_only(m: re.Match[str]) -> str:
        _, at, host = m["authority"].rpartition("@")
        return f"{m['scheme']}{'***@' if at else ''}{host}"

    base, sep, _ = URI_AUTHORITY_RE.sub(host_only, uri.strip()).partition("?")
    return SECRET_VALUE_RE.sub("***", base + ("?***" if sep else ""))


def redact(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` URI in it replaced by ``***``."""
    return URI_USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def connect(uri: str | None) -> str:
    """The resolved tracking URI, once its server answers (:func:`check_tracking_server`)."""
    uri = resolve_tracking_uri(uri)
    check_tracking_server(uri)
    return uri


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
def mlflow_session(uri: str, action: str) -> Iterator[MlflowClient]:
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


def error_code(exc: BaseException) -> str:
    """MLflow's error code of ``exc`` (``RESOURCE_DOES_NOT_EXIST``, …), or ``""``."""
    return getattr(exc, "error_code", "") or ""


def quote(value: str, field: str) -> str:
    """A string literal for an MLflow search filter (no escaping exists: pick the quote it lacks)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise E3PruneError(f"{value!r} holds both quote characters; MLflow search filters cannot express it", field=field)


# --------------------------------------------------------------------------- what may be logged


def looks_secret(key: str, value: str) -> bool:
    """Whether a key (by its words) or a value (by its shape) looks like a credential."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()) if w]
    if SECRET_WORDS.intersection(words) or SECRET_WORD_PAIRS.intersection(zip(words, words[1:], strict=False)):
        return True
    return bool(SECRET_VALUE_RE.search(value))


def safe_items(items: Mapping[str, Any], what: str) -> dict[str, str]:
    """Stringified entries with credentials dropped and URI passwords redacted."""
    safe = {}
    for key, value in items.items():
        text = redact(str(value))
        if looks_secret(str(key), text):
            log.warning("not logging %s %r to MLflow: it looks like a credential", what, key)
            continue
        safe[str(key)] = text
    return safe


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """:func:`safe_items` of run params, each cut to the length MLflow keeps."""
    out = {}
    for key, value in safe_items(params, "param").items():
        if len(value) > MAX_PARAM_CHARS:
            log.warning("param %r is %d characters; MLflow keeps %d, truncating", key, len(value), MAX_PARAM_CHARS)
            value = value[: MAX_PARAM_CHARS - 1] + "…"
        out[key] = value
    return out


# --------------------------------------------------------------------------- the run


def find_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing; a deleted one is a user error."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException as exc:  # created by a racing run in between
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
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


def find_or_create_run(client: MlflowClient, experiment_id: str, run_key: str, run_name: str) -> Run:
    """The run tagged ``e3prune.run_key = run_key`` (the oldest, if several), else a new one."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = {quote(run_key, 'run_key')}",
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    if runs:
        if len(runs) > 1:
            log.warning("%d MLflow runs carry %s=%s; using the oldest", len(runs), RUN_KEY_TAG, run_key)
        return runs[0]
    return client.create_run(experiment_id, run_name=run_name or run_key, tags={RUN_KEY_TAG: run_key})


def log_params(client: MlflowClient, run: Run, params: Mapping[str, str], run_key: str) -> None:
    """``params`` (from :func:`safe_params`) not logged yet; a changed value is an error."""
    from mlflow.entities import Param

    logged = run.data.params
    new = []
    for key, value in params.items():
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


def log_curves(client: MlflowClient, run_id: str, curves: Mapping[str, Sequence[tuple[int, float]]]) -> None:
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


def log_metrics(client: MlflowClient, run: Run, model: LoggedModel, metrics: Mapping[str, float]) -> None:
    """Final metrics of the run and of its logged model; those both hold already are skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    on_run = run.data.metrics
    on_model = {m.key: m.value for m in model.metrics or []}
    batch = [
        Metric(k, float(v), now, 0, model_id=model.model_id)
        for k, v in metrics.items()
        if on_run.get(k) != float(v) or on_model.get(k) != float(v)
    ]
    for i in range(0, len(batch), METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=batch[i : i + METRICS_PER_BATCH])


def log_artifacts(client: MlflowClient, run_id: str, artifacts: Mapping[str, Path]) -> None:
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


def is_local(uri: str) -> bool:
    scheme = urllib.parse.urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter is not a scheme


def local_path(uri: str) -> Path:
    return Path(urllib.parse.urlparse(uri).path if uri.startswith("file:") else uri)


# --------------------------------------------------------------------------- the logged model


def logged_model(client: MlflowClient, run: Run, name: str, model_uri: str, params: Mapping[str, str]) -> LoggedModel:
    """The run's logged model of ``model_uri``: found again on a rerun, else created (READY).

    A checkpoint in S3 becomes an *external* model, its weights never copied; a local directory
    (a server cannot read the client's disk) is uploaded into the model's artifacts instead.
    """
    from mlflow.entities import LoggedModelStatus

    found = _run_models(client, run)
    model = found[0] if found else _create_model(client, run, name, model_uri, params)
    if model.status != LoggedModelStatus.READY:  # an earlier attempt stopped between creating and finalizing
        model = client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return client.get_logged_model(model.model_id)


def _run_models(client: MlflowClient, run: Run) -> list[LoggedModel]:
    """The logged models whose source is ``run``, oldest first."""
    return list(
        client.search_logged_models(
            [run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": True}],
        )
    )


def _create_model(client: MlflowClient, run: Run, name: str, model_uri: str, params: Mapping[str, str]):
    """A new logged model, unless a racing attempt of the same run made one first (the oldest wins)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    local = is_local(model_uri)
    tags = {RUN_KEY_TAG: run.data.tags.get(RUN_KEY_TAG, ""), MODEL_URI_TAG: model_uri}
    if not local:
        tags[MLFLOW_MODEL_IS_EXTERNAL] = "true"
    model = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run.info.run_id,
        tags=tags,
        params=dict(params),
        model_type=MODEL_TYPE,
    )
    if local:
        client.log_model_artifacts(model.model_id, str(local_path(model_uri)))
    else:
        _log_external_spec(client, model)
    winner = _run_models(client, run)[0]
    if winner.model_id != model.model_id:
        log.warning("logged model %s lost a race to %s; deleting it", model.model_id, winner.model_id)
        client.delete_logged_model(model.model_id)
    return winner


def _log_external_spec(client: MlflowClient, model: LoggedModel) -> None:
    """The small ``MLmodel`` file MLflow writes for an external model (``mlflow.create_external_model``)."""
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec

    with tempfile.TemporaryDirectory(prefix="e3prune-mlmodel-") as tmp:
        get_external_mlflow_model_spec(model).save(str(Path(tmp) / MLMODEL_FILE_NAME))
        client.log_model_artifacts(model.model_id, tmp)
