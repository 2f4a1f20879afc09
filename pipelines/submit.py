"""Submit the compiled e3-pruner pipeline to Kubeflow Pipelines, or schedule it.

``e3prune submit`` uploads the pipeline (or a new version of it), gets or creates the
experiment and starts one run; ``e3prune schedule`` does the same upload and then creates a
recurring run. Both read one YAML file, which is a contract: the Helm chart's Job runs
``e3prune schedule --config /etc/e3-pruner/schedule.yaml``. docs/operations.md ("Submitting and
scheduling") documents its keys for operators: the fields of :class:`SubmitConfig` and
:class:`ScheduleConfig`, every one optional except ``cron`` for ``schedule``, whose forms
:mod:`e3prune_pipelines.cron` converts to KFP's.

Credentials never appear in the file: in a pod, the projected service-account token at
``$KF_PIPELINES_SA_TOKEN_PATH`` (default ``/var/run/secrets/kubeflow/pipelines/token``) is used
when that file exists, re-read on every request; otherwise ``$KF_PIPELINES_TOKEN`` if set, sent as
a bearer token; otherwise none (a port-forward to a single-user KFP).

Only this module (and the CLI commands that import it when called) imports kfp; the library
``e3prune`` never does (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import Field, field_validator

from e3prune import __version__
from e3prune.config import StepConfig
from e3prune.errors import E3PruneError
from e3prune_pipelines.cron import kfp_cron

if TYPE_CHECKING:  # pragma: no cover
    import kfp

ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"
TOKEN_ENV = "KF_PIPELINES_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"

# KFP's filter.proto Operation.EQUALS, the value the kfp SDK itself sends.
_EQUALS = 1


SHIPPED = {"cpu": "pipeline.yaml", "gpu": "pipeline-gpu.yaml"}  # `package: gpu` picks the GPU build


def default_package(kind: str = "cpu") -> Path:
    """A compiled pipeline shipped as package data of ``e3prune_pipelines``: the CPU or the GPU build."""
    return Path(str(resources.files("e3prune_pipelines") / "e3_pruner" / SHIPPED[kind]))


# --- configuration ----------------------------------------------------------------------------


class KFPConfig(StepConfig):
    """What ``submit`` and ``schedule`` share: where KFP is, which pipeline, which experiment."""

    host: str | None = Field(
        default_factory=lambda: os.environ.get(ENDPOINT_ENV) or None,
        validate_default=True,
        description=f"KFP API URL, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888 (default ${ENDPOINT_ENV})",
    )
    namespace: str | None = Field(None, min_length=1, description="profile namespace on multi-user Kubeflow")
    pipeline_name: str = Field("e3-pruner", min_length=1, description="the pipeline's name in KFP")
    pipeline_version: str | None = Field(
        None, min_length=1, description="version name (default: e3-pruner version + hash of the package)"
    )
    experiment: str = Field("e3-pruner", min_length=1, description="experiment, got or created")
    package: str | None = Field(
        None, min_length=1, description="compiled pipeline YAML, or cpu / gpu for a shipped build (default: cpu)"
    )
    service_account: str | None = Field(None, min_length=1, description="Kubernetes service account of the runs")
    parameters: dict[str, Any] = Field(default_factory=dict, description="pipeline parameters")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str:
        v = v or os.environ.get(ENDPOINT_ENV)  # an empty `host:` (e.g. from a Helm value) means the env's
        if not v:
            raise ValueError(
                f"no KFP API URL: set host in the config, --host, or ${ENDPOINT_ENV} "
                "(in a cluster: http://ml-pipeline.kubeflow.svc.cluster.local:8888)"
            )
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(
                "must be an http:// or https:// URL, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888"
            )
        return v.rstrip("/")

    @classmethod
    def parse(cls, data: dict[str, Any] | None = None, /, **kwargs: Any):
        """Validate the settings, then the parameters against the package's (typed, coerced)."""
        try:
            cfg = super().parse(data, **kwargs)
        except E3PruneError as exc:  # point unknown keys at this file format's table, not the README's
            msg = str(exc).removeprefix(f"{exc.field}: ")
            msg = msg.replace("the configuration table in the README", "docs/operations.md (Submitting and scheduling)")
            raise E3PruneError(msg, field=exc.field) from None
        params = check_parameters(cfg.parameters, pipeline_inputs(cfg.package_path()))
        return cfg.model_copy(update={"parameters": params})

    @classmethod
    def from_yaml(cls, path: str | Path | None, /, **overrides: Any):
        """The config in the YAML file ``path`` (or none), with ``overrides`` that are not ``None``
        on top; ``parameters`` given both ways are merged, the overrides winning."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except OSError as exc:
                raise E3PruneError(f"cannot read {path}: {exc.strerror}", field="config") from None
            except yaml.YAMLError as exc:
                raise E3PruneError(f"{path} is not valid YAML: {exc}", field="config") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise E3PruneError(
                    f"{path} must hold a mapping of settings, got {type(loaded).__name__}", field="config"
                )
            data = dict(loaded or {})
        given = {k: v for k, v in overrides.items() if v is not None}
        if "parameters" in given:
            file_params = data.get("parameters") or {}
            if not isinstance(file_params, dict):
                raise E3PruneError("must be a mapping of parameter names to values", field="parameters")
            given["parameters"] = {**file_params, **given["parameters"]}
        return cls.parse({**data, **given})

    def package_path(self) -> Path:
        path = default_package(self.package or "cpu") if (self.package or "cpu") in SHIPPED else Path(self.package)
        if not path.is_file():
            hint = "" if self.package else " (the shipped pipeline is missing: compile pipelines/e3_pruner)"
            raise E3PruneError(f"compiled pipeline {path} does not exist{hint}", field="package")
        if path.suffix not in (".yaml", ".yml"):
            raise E3PruneError(f"{path} must be a compiled pipeline .yaml file", field="package")
        return path

    def version_name(self) -> str:
        """``pipeline_version``, or ``<e3-pruner version>-<12 hex of sha256(package)>``: the same
        YAML always gets the same name, so uploading it again is a no-op."""
        if self.pipeline_version:
            return self.pipeline_version
        digest = hashlib.sha256(self.package_path().read_bytes()).hexdigest()[:12]
        return f"{__version__}-{digest}"


class SubmitConfig(KFPConfig):
    """``e3prune submit``: one run of the pipeline."""

    run_name: str | None = Field(None, min_length=1, description="run name (default: pipeline name + UTC time)")


class ScheduleConfig(KFPConfig):
    """``e3prune schedule``: a recurring run, replacing any of the same ``name`` in the experiment."""

    name: str = Field("e3-pruner", min_length=1, description="recurring run name; an existing one is replaced")
    cron: str = Field(description="five fields, six (seconds first) or a macro; stored in KFP's six-field form")
    max_concurrency: int = Field(1, ge=1, le=10, description="runs of this schedule at once (KFP allows 1-10)")
    catchup: bool = Field(False, description="after a pause, run once per missed slot instead of once")
    enabled: bool = True

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return kfp_cron(v)  # its ValueError becomes the error on `cron`


# --- pipeline parameters ----------------------------------------------------------------------


def pipeline_inputs(package: Path) -> dict[str, dict[str, Any]]:
    """The compiled pipeline's parameters: ``root.inputDefinitions.parameters`` of its first
    YAML document (later documents are the platform spec), name → {parameterType, defaultValue…}."""
    try:
        spec = next(yaml.safe_load_all(package.read_text()), None)
    except yaml.YAMLError as exc:
        raise E3PruneError(f"{package} is not valid YAML: {exc}", field="package") from None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise E3PruneError(f"{package} is not a compiled KFP pipeline (no root / pipelineInfo)", field="package")
    return dict(((spec["root"].get("inputDefinitions") or {}).get("parameters")) or {})


def check_parameters(params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``params`` checked against the pipeline's ``inputs`` and coerced to their types.

    Every key must be a pipeline parameter; every parameter without a default must be given;
    strings (``--param k=v``) are converted to the declared type (int, float, bool, JSON list/dict).
    """
    allowed = ", ".join(sorted(inputs)) or "(none: the pipeline takes no parameters)"
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in inputs:
            raise E3PruneError(f"not a parameter of the pipeline; allowed: {allowed}", field=f"parameters.{key}")
        out[key] = _coerce(key, value, inputs[key].get("parameterType", "STRING"))
    for key, spec in sorted(inputs.items()):
        if key not in out and "defaultValue" not in spec and not spec.get("isOptional", False):
            raise E3PruneError(
                f"required by the pipeline (it has no default); give it under parameters: or as --param {key}=VALUE",
                field=f"parameters.{key}",
            )
    return out


# KFP parameter type → what the error says a value of it must be.
_KINDS = {
    "STRING": "a string",
    "NUMBER_INTEGER": "a whole number",
    "NUMBER_DOUBLE": "a number",
    "BOOLEAN": "true or false",
    "LIST": "a list (JSON array on the command line)",
    "STRUCT": "a mapping (JSON object on the command line)",
}


def _coerce(key: str, value: Any, ptype: str) -> Any:
    if ptype not in _KINDS:
        return value  # a type this code does not know: passed as given, KFP checks it
    try:
        return _convert(value, ptype)
    except (TypeError, ValueError):
        raise E3PruneError(f"must be {_KINDS[ptype]}, got {value!r}", field=f"parameters.{key}") from None


def _convert(value: Any, ptype: str) -> Any:
    """``value`` as a ``ptype``; strings (``--param k=v``) are parsed. ValueError when it is not one:
    no bool for a number, no fraction for a whole number, no list or mapping for a string."""
    if ptype == "BOOLEAN":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif ptype in ("LIST", "STRUCT"):
        parsed = json.loads(value) if isinstance(value, str) else value
        if isinstance(parsed, list if ptype == "LIST" else dict):
            return parsed
    elif isinstance(value, bool):
        if ptype == "STRING":
            return json.dumps(value)  # true / false, as the YAML said it
    elif ptype == "STRING":
        if not isinstance(value, (dict, list)):
            return str(value)
    elif ptype == "NUMBER_INTEGER":
        if not (isinstance(value, float) and not value.is_integer()):
            return int(value)
    elif ptype == "NUMBER_DOUBLE":
        return float(value)
    raise ValueError(f"not {_KINDS[ptype]}")


# --- the KFP client ---------------------------------------------------------------------------


@contextlib.contextmanager
def _kfp_calls(host: str) -> Iterator[None]:
    """Run kfp client calls quietly (it prints links and warns about its server version) and turn
    what a wrong host, wrong credentials or a refusing server raise into one E3PruneError."""
    import kfp_server_api
    import urllib3

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            yield
        except kfp_server_api.ApiException as exc:
            raise E3PruneError(
                _api_error_message(host, exc), field="host" if exc.status in (0, 401, 403) else None
            ) from None
        except urllib3.exceptions.HTTPError as exc:
            raise E3PruneError(f"cannot reach the KFP API at {host}: {exc}", field="host") from None
        except TimeoutError as exc:  # the client's healthz probe gave up after its retries
            raise E3PruneError(f"the KFP API at {host} did not answer: {exc}", field="host") from None
        except E3PruneError:
            raise
        except ValueError as exc:  # the SDK's own checks, e.g. two experiments of one name
            raise E3PruneError(f"KFP: {exc}") from None


def _api_error_message(host: str, exc: Any) -> str:
    detail = ""
    try:
        body = json.loads(exc.body or "{}")
        detail = body.get("message") or body.get("error") or ""
    except (TypeError, ValueError, AttributeError):
        detail = str(exc.body or "")[:500]
    msg = f"the KFP API at {host} answered {exc.status} {exc.reason}" + (f": {detail}" if detail else "")
    if exc.status in (401, 403):
        msg += (
            f"; check the credentials: the service-account token at ${SA_TOKEN_PATH_ENV} (default {SA_TOKEN_PATH}) "
            f"in a pod, or ${TOKEN_ENV}, and that the namespace is one you may use"
        )
    return msg


def connect(cfg: KFPConfig) -> kfp.Client:
    """A kfp Client for ``cfg.host``: with the projected service-account token when its file
    exists, else with ``$KF_PIPELINES_TOKEN`` when set, else without credentials."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    token_path = os.environ.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH
    auth: dict[str, Any] = {}
    if Path(token_path).is_file():
        auth["credentials"] = ServiceAccountTokenVolumeCredentials(path=token_path)
    elif os.environ.get(TOKEN_ENV):
        auth["existing_token"] = os.environ[TOKEN_ENV]
    with _kfp_calls(cfg.host):
        # A namespace given here only sets the client's context namespace (with a host, its other
        # use — the in-cluster DNS name — does not apply); it also skips the healthz probe that
        # would write ~/.config/kfp/context.json on multi-user clusters.
        return kfp.Client(host=cfg.host, namespace=cfg.namespace or "kubeflow", **auth)


def _equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": key, "stringValue": value}]})


def _find_pipeline(client: kfp.Client, cfg: KFPConfig) -> str | None:
    resp = client.list_pipelines(
        filter=_equals("display_name", cfg.pipeline_name), namespace=cfg.namespace, page_size=100
    )
    found = [p for p in resp.pipelines or [] if cfg.pipeline_name in (p.display_name, p.name)]
    if len(found) > 1:
        ids = ", ".join(p.pipeline_id for p in found)
        raise E3PruneError(
            f"{len(found)} pipelines are named {cfg.pipeline_name!r} ({ids}); delete all but one", field="pipeline_name"
        )
    return found[0].pipeline_id if found else None


def _find_version(client: kfp.Client, pipeline_id: str, version: str) -> str | None:
    resp = client.list_pipeline_versions(pipeline_id, filter=_equals("display_name", version), page_size=100)
    found = [v for v in resp.pipeline_versions or [] if version in (v.display_name, v.name)]
    return found[0].pipeline_version_id if found else None


def _ensure_pipeline(client: kfp.Client, cfg: KFPConfig) -> tuple[str, bool]:
    """(pipeline id, created now): the pipeline ``cfg.pipeline_name``, created empty when missing."""
    import kfp_server_api

    pipeline_id = _find_pipeline(client, cfg)
    if pipeline_id is not None:
        return pipeline_id, False
    description = "e3-pruner: decoder-layer pruning and distillation of causal LMs"
    body = kfp_server_api.V2beta1Pipeline(
        name=cfg.pipeline_name, display_name=cfg.pipeline_name, namespace=cfg.namespace, description=description
    )
    try:
        return client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id, True
    except kfp_server_api.ApiException as exc:  # created meanwhile by a concurrent upload
        if exc.status != 409 or not (pipeline_id := _find_pipeline(client, cfg)):
            raise
        return pipeline_id, False


def _ensure_version(client: kfp.Client, cfg: KFPConfig, pipeline_id: str) -> tuple[str, bool]:
    """(version id, uploaded now): version ``cfg.version_name()`` of the pipeline, uploaded when missing."""
    import kfp_server_api

    package, version = cfg.package_path(), cfg.version_name()
    version_id = _find_version(client, pipeline_id, version)
    if version_id is not None:
        return version_id, False
    description = f"e3-pruner {__version__}, {package.name}"
    try:
        uploaded = client.upload_pipeline_version(
            str(package), pipeline_version_name=version, pipeline_id=pipeline_id, description=description
        )
        return uploaded.pipeline_version_id, True
    except kfp_server_api.ApiException as exc:  # uploaded meanwhile by a concurrent upload
        if exc.status != 409 or not (version_id := _find_version(client, pipeline_id, version)):
            raise
        return version_id, False


def _upload(client: kfp.Client, cfg: KFPConfig) -> tuple[str, str, str]:
    """(pipeline id, version id, what was done). The pipeline is created empty and the package
    uploaded as a version of it, so that every version, the first included, carries the
    content-derived name that makes a second upload of the same YAML a no-op (uploading a new
    pipeline would name its first version after the pipeline)."""
    with _kfp_calls(cfg.host):
        pipeline_id, created = _ensure_pipeline(client, cfg)
        version_id, uploaded = _ensure_version(client, cfg, pipeline_id)
    name, version = cfg.pipeline_name, cfg.version_name()
    if not uploaded:
        return pipeline_id, version_id, f"pipeline {name!r} version {version!r} already uploaded"
    what = "created pipeline" if created else "uploaded to pipeline"
    return pipeline_id, version_id, f"{what} {name!r} version {version!r}"


def upload(client: kfp.Client, cfg: KFPConfig) -> tuple[str, str]:
    """Upload the package as version ``cfg.version_name()`` of pipeline ``cfg.pipeline_name``,
    creating the pipeline when there is none of that name and doing nothing when the version
    exists already (idempotent). Returns (pipeline_id, pipeline_version_id)."""
    pipeline_id, version_id, _ = _upload(client, cfg)
    return pipeline_id, version_id


def _ui(cfg: KFPConfig) -> str:
    return (os.environ.get(UI_ENDPOINT_ENV) or cfg.host).rstrip("/")


def _experiment_id(client: kfp.Client, cfg: KFPConfig) -> str:
    with _kfp_calls(cfg.host):  # the SDK's create_experiment gets the experiment when it exists
        return client.create_experiment(cfg.experiment, namespace=cfg.namespace).experiment_id


def _prepare(cfg: KFPConfig) -> tuple[kfp.Client, dict[str, Any], dict[str, Any]]:
    """What ``submit`` and ``schedule`` do first: check the parameters, connect, upload (or reuse)
    the pipeline version, get or create the experiment. Returns (client, parameters, the ids)."""
    params = check_parameters(cfg.parameters, pipeline_inputs(cfg.package_path()))
    client = connect(cfg)
    pipeline_id, version_id, uploaded = _upload(client, cfg)
    ids = {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version_id,
        "pipeline_version": cfg.version_name(),
        "upload": uploaded,
        "experiment_id": _experiment_id(client, cfg),
    }
    return client, params, ids


def submit(cfg: SubmitConfig) -> dict[str, Any]:
    """Upload (or reuse) the pipeline version, get or create the experiment, start one run."""
    client, params, ids = _prepare(cfg)
    run_name = cfg.run_name or f"{cfg.pipeline_name} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
    with _kfp_calls(cfg.host):
        run = client.run_pipeline(
            ids["experiment_id"],
            run_name,
            params=params,
            pipeline_id=ids["pipeline_id"],
            version_id=ids["pipeline_version_id"],
            service_account=cfg.service_account,
        )
    return {**ids, "run_id": run.run_id, "run_name": run_name, "run_url": f"{_ui(cfg)}/#/runs/details/{run.run_id}"}


def _recurring_runs_named(client: kfp.Client, experiment_id: str, name: str) -> list[Any]:
    found, token = [], ""
    while True:
        resp = client.list_recurring_runs(
            page_token=token, page_size=100, experiment_id=experiment_id, filter=_equals("display_name", name)
        )
        found += [r for r in resp.recurring_runs or [] if r.display_name == name]
        token = resp.next_page_token or ""
        if not token:
            return found


def schedule(cfg: ScheduleConfig) -> dict[str, Any]:
    """Upload (or reuse) the pipeline version and create the recurring run ``cfg.name``.

    KFP cannot update a recurring run, only delete and create one: any recurring run of the same
    name in the experiment is deleted first (``replaced`` lists their ids), so there is never a
    second schedule of that name.
    """
    client, params, ids = _prepare(cfg)
    with _kfp_calls(cfg.host):
        replaced = [r.recurring_run_id for r in _recurring_runs_named(client, ids["experiment_id"], cfg.name)]
        for recurring_run_id in replaced:
            client.delete_recurring_run(recurring_run_id)
        created = client.create_recurring_run(
            ids["experiment_id"],
            cfg.name,
            description=f"Managed by `e3prune schedule`: running it again replaces this recurring run ({cfg.cron}).",
            cron_expression=cfg.cron,
            max_concurrency=cfg.max_concurrency,
            no_catchup=not cfg.catchup,  # the SDK's default (None) leaves KFP's: catch up
            params=params,
            pipeline_id=ids["pipeline_id"],
            version_id=ids["pipeline_version_id"],
            enabled=cfg.enabled,
            service_account=cfg.service_account,
        )
    return {
        **ids,
        "recurring_run_id": created.recurring_run_id,
        "name": cfg.name,
        "cron": cfg.cron,
        "replaced": replaced,
        "recurring_run_url": f"{_ui(cfg)}/#/recurringrun/details/{created.recurring_run_id}",
    }
