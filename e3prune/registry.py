"""The model registry (MLflow): register the compressed model of a pipeline run as a version.

The last step of a pipeline run (docs/operations.md, ``register``); the promotion gate that moves
``champion`` is :mod:`e3prune.gate`, the connection to MLflow and the run's logging
:mod:`e3prune.tracking`, and reading a run's step outputs into a registration
:mod:`e3prune.registration`.

Register (:func:`register`)
    One MLflow run per pipeline run, found by its run key (:func:`e3prune.tracking.find_or_create_run`),
    so a retried ``register`` (after a network failure, a pod eviction) logs into the same run and
    reuses the logged model and the model version it created before — never a second run, model
    or version. Params, curves, final metrics and artifacts go into the run; the exported
    checkpoint becomes the run's logged model (:func:`e3prune.tracking.logged_model`, with the
    final metrics), and the version is created from that logged model (``model_id``; the server
    records the version on the model), so the MLflow UI shows run → logged model → version; the
    version names its model in the tag ``e3prune.model_id`` (:func:`version_model_id`). The
    version gets the ``challenger`` alias.

    The version's ``source`` is the exported model itself (``s3://…``), not a copy in MLflow's
    artifact store: ``MlflowClient.create_model_version(name, source="s3://…", run_id=…,
    model_id=…)`` is accepted by an MLflow 3.17 server as is (its source validation only
    restricts local paths, ``runs:/`` / ``models:/`` / ``mlflow-artifacts:`` URIs and
    host-addressed schemes such as ``http``), so an 8B checkpoint is never copied a second time
    and serving reads it from where the export step put it; the logged model is *external*. A
    *local* ``model_uri`` is a different matter: a tracking server refuses a local path as a
    version source (it could not read it), so a local directory is uploaded into the logged
    model's artifacts and the version points there.

    ``release_tags`` (source, revision, ratio: :func:`e3prune.releases.release_tags`) make a
    release register at most once: two runs racing on it both create a version, then the newer
    one is deleted and its run reuses the older; a later run finds the version and keeps it.

    Every final metric is also written as a version tag ``metric.<key>`` (e.g.
    ``metric.student.perplexity_ratio``): the promotion gate then reads one object, the version,
    whatever run or experiment it came from.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field, field_validator

from e3prune import tracking
from e3prune.config import StepConfig
from e3prune.errors import E3PruneError
from e3prune.tracking import RUN_KEY_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel, Run
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

SOURCE_TAG = "e3prune.source"  # the source model a version was compressed from (its "family")
METRIC_TAG_PREFIX = "metric."
# The logged model a version was created from. MLflow's SQL registry (3.17) does not store the
# ``model_id`` it is given (the server records the version on the logged model instead, tag
# ``mlflow.modelVersions``), so the version carries it as a tag too: see :func:`version_model_id`.
MODEL_ID_TAG = "e3prune.model_id"
CHALLENGER = "challenger"
CHAMPION = "champion"

# Registered-model names: MLflow forbids '/' and ':'; we also keep to characters that need no
# quoting in search filters, URLs and shells.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,249}$")
RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,249}$")
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,254}$")


def check_model_name(v: str) -> str:
    """``v`` if it is a registered-model name MLflow and our search filters accept (``ValueError`` if not)."""
    if not MODEL_NAME_RE.match(v):
        raise ValueError(
            "must be 1-250 characters: letters, digits, '_', '.', '-', starting with a letter or digit "
            "(MLflow forbids '/' and ':'; write a hub id like Qwen/Qwen3-8B as Qwen3-8B or Qwen--Qwen3-8B)"
        )
    return v


def require_model_name(name: str) -> None:
    """:func:`check_model_name` for a function argument: a user error naming ``model_name``."""
    try:
        check_model_name(name)
    except ValueError as exc:
        raise E3PruneError(f"{exc} (got {name!r})", field="model_name") from None


ModelName = Annotated[str, AfterValidator(check_model_name)]  # a registered model's name, checked


class RegisterConfig(StepConfig):
    """What ``register`` takes: where the model is, what to call it, and the pipeline run's key."""

    model_name: ModelName = Field(description="registered model name in the MLflow registry")
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


# --------------------------------------------------------------------------- register


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

    ``params`` become run params (strings; what looks like a credential is dropped) and params of
    the logged model, ``curves`` metric histories (``{"distill/loss": [(step, value), …]}``),
    ``metrics`` the final metrics of the run and the logged model (``{"student.perplexity":
    41.2}``; also version tags ``metric.<key>``), ``artifacts`` files in the run
    (``{"eval/summary.md": "/tmp/summary.md"}``), ``tags`` version tags (pass ``e3prune.source``
    for the promotion gate's champion comparison). Rerunning with the same ``run_key`` reuses the
    run, the logged model and the version. Returns ``tracking_uri``, ``experiment_id``,
    ``run_id``, ``model_id`` (the logged model), ``model_name``, ``version``, ``alias``,
    ``model_uri`` (the version's source) and ``duplicate_of_release``.
    """
    uri = tracking.connect(cfg.tracking_uri)
    metrics, curves = dict(metrics or {}), dict(curves or {})
    local_artifacts = _checked_inputs(cfg, metrics, curves, artifacts or {})  # before the first write
    version_tags = tracking.safe_items(dict(tags or {}), "tag")
    version_tags.update({f"{METRIC_TAG_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()})  # full precision
    version_tags[RUN_KEY_TAG] = cfg.run_key
    version_tags.update(cfg.release_tags)
    safe_params = tracking.safe_params(dict(params or {}))

    with tracking.mlflow_session(uri, "registering the model") as client:
        experiment_id = tracking.find_experiment(client, cfg.experiment)
        run = tracking.find_or_create_run(client, experiment_id, cfg.run_key, cfg.run_name)
        tracking.log_params(client, run, safe_params, cfg.run_key)
        tracking.log_curves(client, run.info.run_id, curves)
        model = tracking.logged_model(client, run, cfg.model_name, cfg.model_uri, safe_params)
        tracking.log_metrics(client, run, model, metrics)
        tracking.log_artifacts(client, run.info.run_id, local_artifacts)
        mv = _version(client, cfg, run, model, {**version_tags, MODEL_ID_TAG: model.model_id})
        duplicate = mv.tags.get(RUN_KEY_TAG) != cfg.run_key
        if not duplicate:  # the alias is this run's to set; a release registered by another run keeps its own
            client.set_registered_model_alias(cfg.model_name, cfg.alias, mv.version)
        client.set_terminated(run.info.run_id, "FINISHED")
    log.info("registered %s version %s (alias %s) from run %s", cfg.model_name, mv.version, cfg.alias, run.info.run_id)
    return {
        "tracking_uri": tracking.redact(uri),
        "experiment_id": experiment_id,
        "run_id": run.info.run_id,
        "model_id": model.model_id,
        "model_name": cfg.model_name,
        "version": str(mv.version),
        "alias": cfg.alias,
        "model_uri": mv.source,
        "duplicate_of_release": duplicate,
    }


def _checked_inputs(
    cfg: RegisterConfig,
    metrics: Mapping[str, Any],
    curves: Mapping[str, Any],
    artifacts: Mapping[str, str | Path],
) -> dict[str, Path]:
    """Everything a user can get wrong, checked before the first write; returns the artifacts as paths."""
    local_artifacts = {}
    for name, path in artifacts.items():
        name = str(name).strip("/")
        if not name or ".." in name.split("/"):
            raise E3PruneError(
                f"artifact name {name!r} must be a relative path like eval/summary.md", field="artifacts"
            )
        local = Path(path)
        if not local.exists():
            raise E3PruneError(f"artifact {name!r}: {local} does not exist", field="artifacts")
        local_artifacts[name] = local
    for key, value in metrics.items():
        _check_metric_key(key, "metrics")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise E3PruneError(f"metric {key!r} must be a number, got {value!r}", field="metrics")
    for key in curves:
        _check_metric_key(key, "curves")
    if tracking.is_local(cfg.model_uri) and not tracking.local_path(cfg.model_uri).is_dir():
        raise E3PruneError(
            f"{cfg.model_uri} is not a directory; give the exported model's directory or its s3:// URI",
            field="model_uri",
        )
    return local_artifacts


def _check_metric_key(key: str, field: str) -> None:
    if not key or not re.fullmatch(r"[\w.\-/ ]+", key) or len(key) > 250:
        raise E3PruneError(
            f"metric key {key!r} is not allowed by MLflow: use letters, digits, '_', '-', '.', '/', ' '", field=field
        )


def _version(client: MlflowClient, cfg: RegisterConfig, run: Run, model: LoggedModel, tags: dict[str, str]):
    """This run's version: an earlier attempt's (tags brought up to date), the release's, or a new one."""
    _ensure_registered_model(client, cfg.model_name)
    existing = _first_version(client, cfg)
    if existing is not None and existing.tags.get(RUN_KEY_TAG) != cfg.run_key:
        # Another run registered this release first: keep its version, record ours in the run only.
        log.warning(
            "%s is registered already as version %s; not registering it twice", cfg.release_tags, existing.version
        )
        return existing
    if existing is not None:
        return _update_tags(client, existing, tags)
    # A local directory was uploaded into the logged model: the version points there.
    source = model.artifact_location if tracking.is_local(cfg.model_uri) else cfg.model_uri
    return _create_version(client, cfg, run.info.run_id, model.model_id, source, tags)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if tracking.error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="Layer-pruned, distilled models written by e3-pruner.")
        except MlflowException as exc2:  # created by a racing run in between
            if tracking.error_code(exc2) != "RESOURCE_ALREADY_EXISTS":
                raise


def _create_version(
    client: MlflowClient, cfg: RegisterConfig, run_id: str, model_id: str, source: str, tags: dict[str, str]
) -> ModelVersion:
    """A new version of the logged model ``model_id``, unless a racing attempt got there first.

    Two attempts racing on one run key (or one release) could both find no version and both
    create one; after creating, the lowest version carrying the key or release wins and a loser
    deletes its own, so one version remains.
    """
    mv = client.create_model_version(cfg.model_name, source, run_id=run_id, tags=tags, model_id=model_id)
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


# --------------------------------------------------------------------------- finding versions


def version_model_id(mv: ModelVersion) -> str | None:
    """The id of the logged model ``mv`` was created from: ``mv.model_id`` where the registry keeps it, else its tag."""
    return mv.model_id or (mv.tags or {}).get(MODEL_ID_TAG)


def find_versions(model_name: str, tags: Mapping[str, str], tracking_uri: str | None = None) -> list[ModelVersion]:
    """Versions of ``model_name`` whose tags equal ``tags`` (all of them), oldest first.

    The question a recurring run asks before compressing: "was this source revision already
    done?" — e.g. ``find_versions(name, {"e3prune.source_revision": sha})``. A model that does
    not exist has no versions.
    """
    require_model_name(model_name)
    uri = tracking.connect(tracking_uri)
    with tracking.mlflow_session(uri, "searching model versions") as client:
        return _search_versions(client, model_name, dict(tags))


def _search_versions(client: MlflowClient, model_name: str, tags: Mapping[str, str]) -> list[ModelVersion]:
    parts = [f"name = {tracking.quote(model_name, 'model_name')}"]
    for key, value in tags.items():
        if "`" in key:
            raise E3PruneError(f"tag key {key!r} holds a backtick", field="tags")
        parts.append(f"tags.`{key}` = {tracking.quote(value, 'tags')}")
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(" AND ".join(parts), max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    return sorted(found, key=lambda mv: int(mv.version))
