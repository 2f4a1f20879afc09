"""Submit the compiled e3-pruner pipeline to Kubeflow Pipelines, or schedule it.

``e3prune submit`` uploads the pipeline (or a new version of it), gets or creates the
experiment and starts one run; ``e3prune schedule`` does the same upload and then creates a
recurring run. Both read one YAML file, which is a contract: the Helm chart's Job runs
``e3prune schedule --config /etc/e3-pruner/schedule.yaml``. docs/operations.md ("Submitting and
scheduling") documents it for operators.

The YAML file (every key optional except ``cron`` for ``schedule``)::

    host: http://ml-pipeline.kubeflow.svc.cluster.local:8888   # KFP API; default $KF_PIPELINES_ENDPOINT
    namespace: team-a           # multi-user Kubeflow: the profile namespace; omit on single-user
    pipeline_name: e3-pruner    # the pipeline's name in KFP
    pipeline_version: null      # default: <e3-pruner version>-<sha256 of the package, 12 hex>
    experiment: e3-pruner       # got or created
    package: null               # compiled pipeline YAML; default: the one shipped in e3prune_pipelines
    service_account: null       # Kubernetes service account the runs use (KFP's default if unset)
    parameters:                 # pipeline parameters; each key must be one of the pipeline's
      source_model: Qwen/Qwen3-8B
      remove_ratio: 0.25
    # submit only
    run_name: null              # default: "<pipeline_name> <UTC time>"
    # schedule only
    name: e3-pruner             # the recurring run's name; an existing one of that name is replaced
    cron: "0 3 * * *"           # five fields, six (seconds first, KFP's form) or a macro (@daily, @every 6h)
    max_concurrency: 1          # 1..10 (KFP's bounds)
    catchup: false              # false: after a pause, run once, not once per missed slot
    enabled: true

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

if TYPE_CHECKING:  # pragma: no cover
    import kfp

ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"
TOKEN_ENV = "KF_PIPELINES_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"

# KFP's filter.proto Operation.EQUALS, the value the kfp SDK itself sends.
_EQUALS = 1


def default_package() -> Path:
    """The compiled pipeline shipped as package data of ``e3prune_pipelines``."""
    return Path(str(resources.files("e3prune_pipelines") / "e3_pruner" / "pipeline.yaml"))


# --- cron --------------------------------------------------------------------------------------
#
# KFP validates and runs cron schedules with github.com/robfig/cron v1.2 (`cron.Parse`): six
# fields, seconds first; a five-field spec is *also* accepted there, but read as seconds-first
# with the day of week left out, so the usual "0 3 * * *" would run at minute 3 of every hour.
# Hence the conversion here. Its descriptors are @yearly, @annually, @monthly, @weekly, @daily,
# @midnight, @hourly and "@every <Go duration>". Times are the scheduled-workflow controller's
# (UTC unless the cluster set CRON_SCHEDULE_TIMEZONE).

_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
# (name, lowest, highest, names) in KFP's order.
_CRON_FIELDS = (
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_CRON_FORMS = (
    "give five fields 'minute hour day-of-month month day-of-week' (e.g. '0 3 * * *'), six with "
    "seconds first as KFP takes them (e.g. '0 0 3 * * *'), or a macro: " + ", ".join(_MACROS) + ", '@every 6h'"
)


def cron_six_fields(expr: str) -> str:
    """KFP's six-field cron (seconds first) for ``expr``; raises :class:`E3PruneError` on ``cron``.

    Five fields ``m h dom mon dow`` get a leading ``0`` second; six fields are kept; the macros of
    robfig/cron (``@daily``, ``@every 1h30m``, …) are kept. Each field may hold numbers in its range,
    names (``JAN``–``DEC``, ``SUN``–``SAT``), ``*``, ``?`` (day of month / week), ranges ``a-b``,
    lists ``a,b`` and steps ``*/n``, ``a/n``, ``a-b/n``. Day of week is 0–6, 0 = Sunday (no 7).
    """
    try:
        return _cron_six_fields(expr)
    except ValueError as exc:
        raise E3PruneError(str(exc), field="cron") from None


def _cron_six_fields(expr: str) -> str:
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"empty; {_CRON_FORMS}")
    fields = expr.split()
    if fields[0].startswith("@"):
        return _cron_macro(fields)
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise ValueError(f"{len(fields)} fields in {expr.strip()!r}; {_CRON_FORMS}")
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS, strict=True):
        _check_cron_field(text, name, lo, hi, names)
    return " ".join(fields)


def _cron_macro(fields: list[str]) -> str:
    if len(fields) == 1 and fields[0].lower() in _MACROS:
        return fields[0].lower()
    if fields[0].lower() == "@every" and len(fields) == 2:
        text = fields[1]
        parts = _GO_DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"'@every' takes a Go duration such as 30m, 6h or 1h30m, got {text!r}")
        seconds = sum(float(n) * _GO_UNIT_SECONDS[u] for n, u in parts)
        if seconds < 1:
            raise ValueError(f"'@every {text}' is under KFP's 1-second resolution; give at least 1s")
        return f"@every {text}"
    raise ValueError(f"unknown macro {' '.join(fields)!r}; {_CRON_FORMS}")


def _check_cron_field(text: str, name: str, lo: int, hi: int, names: dict[str, int] | None) -> None:
    allowed = f"{lo}-{hi}" + (
        f" or {min(names, key=names.get).upper()}-{max(names, key=names.get).upper()}" if names else ""
    )
    if name == "day of week":
        allowed += ", 0 = Sunday (no 7)"

    def value(token: str) -> int:
        where = "" if token == text else f" in {text!r}"
        if names and token.lower() in names:
            return names[token.lower()]
        if not token.isdigit():
            raise ValueError(f"{name}: {token!r}{where} is not a number {allowed}")
        number = int(token)
        if not lo <= number <= hi:
            raise ValueError(f"{name}: {number}{where} is out of range {allowed}")
        return number

    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"{name}: step {step!r} in {text!r} must be a positive whole number")
        if span in ("*", "?"):
            if span == "?" and name not in ("day of month", "day of week"):
                raise ValueError(f"{name}: '?' is only for day of month / day of week; use '*'")
            continue
        if not span:
            raise ValueError(
                f"{name}: empty item in {text!r}; items are *, ?, a number {allowed}, a range a-b, with an optional /step"
            )
        low, dash, high = span.partition("-")
        start = value(low)
        if dash and value(high) < start:
            raise ValueError(f"{name}: range {span!r} runs backwards; give low-high")


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
    package: str | None = Field(None, min_length=1, description="compiled pipeline YAML (default: the shipped one)")
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
            msg = (
                str(exc)
                .removeprefix(f"{exc.field}: ")
                .replace("the configuration table in the README", "docs/operations.md (Submitting and scheduling)")
            )
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
        path = Path(self.package) if self.package else default_package()
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
        return _cron_six_fields(v)  # its ValueError becomes the error on `cron`


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


def _coerce(key: str, value: Any, ptype: str) -> Any:
    field = f"parameters.{key}"
    try:
        if ptype == "STRING":
            if isinstance(value, (dict, list)):
                raise ValueError
            return value if isinstance(value, str) else json.dumps(value) if isinstance(value, bool) else str(value)
        if ptype == "NUMBER_INTEGER":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if ptype == "NUMBER_DOUBLE":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if ptype == "BOOLEAN":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if ptype in ("LIST", "STRUCT"):
            want = list if ptype == "LIST" else dict
            parsed = json.loads(value) if isinstance(value, str) else value
            if not isinstance(parsed, want):
                raise ValueError
            return parsed
    except (TypeError, ValueError):
        kinds = {
            "STRING": "a string",
            "NUMBER_INTEGER": "a whole number",
            "NUMBER_DOUBLE": "a number",
            "BOOLEAN": "true or false",
            "LIST": "a list (JSON array on the command line)",
            "STRUCT": "a mapping (JSON object on the command line)",
        }
        raise E3PruneError(f"must be {kinds[ptype]}, got {value!r}", field=field) from None
    return value  # a type this code does not know: passed as given, KFP checks it


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


def _upload(client: kfp.Client, cfg: KFPConfig) -> tuple[str, str, str]:
    """(pipeline id, version id, what was done). The pipeline is created empty and the package
    uploaded as a version of it, so that every version, the first included, carries the
    content-derived name that makes a second upload of the same YAML a no-op (uploading a new
    pipeline would name its first version after the pipeline)."""
    import kfp_server_api

    package, version = cfg.package_path(), cfg.version_name()
    with _kfp_calls(cfg.host):
        pipeline_id = _find_pipeline(client, cfg)
        created = pipeline_id is None
        if created:
            body = kfp_server_api.V2beta1Pipeline(
                name=cfg.pipeline_name,
                display_name=cfg.pipeline_name,
                namespace=cfg.namespace,
                description="e3-pruner: decoder-layer pruning and distillation of causal LMs",
            )
            try:
                pipeline_id = client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
            except kfp_server_api.ApiException as exc:  # created meanwhile by a concurrent upload
                if exc.status != 409 or not (pipeline_id := _find_pipeline(client, cfg)):
                    raise
                created = False
        version_id = _find_version(client, pipeline_id, version)
        if version_id is not None:
            return pipeline_id, version_id, f"pipeline {cfg.pipeline_name!r} version {version!r} already uploaded"
        try:
            version_id = client.upload_pipeline_version(
                str(package),
                pipeline_version_name=version,
                pipeline_id=pipeline_id,
                description=f"e3-pruner {__version__}, {package.name}",
            ).pipeline_version_id
        except kfp_server_api.ApiException as exc:
            if exc.status != 409 or not (version_id := _find_version(client, pipeline_id, version)):
                raise
            return pipeline_id, version_id, f"pipeline {cfg.pipeline_name!r} version {version!r} already uploaded"
    what = "created pipeline" if created else "uploaded to pipeline"
    return pipeline_id, version_id, f"{what} {cfg.pipeline_name!r} version {version!r}"


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


def submit(cfg: SubmitConfig) -> dict[str, Any]:
    """Upload (or reuse) the pipeline version, get or create the experiment, start one run."""
    params = check_parameters(cfg.parameters, pipeline_inputs(cfg.package_path()))
    client = connect(cfg)
    pipeline_id, version_id, uploaded = _upload(client, cfg)
    experiment_id = _experiment_id(client, cfg)
    run_name = cfg.run_name or f"{cfg.pipeline_name} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
    with _kfp_calls(cfg.host):
        run = client.run_pipeline(
            experiment_id,
            run_name,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=cfg.service_account,
        )
    return {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version_id,
        "pipeline_version": cfg.version_name(),
        "upload": uploaded,
        "experiment_id": experiment_id,
        "run_id": run.run_id,
        "run_name": run_name,
        "run_url": f"{_ui(cfg)}/#/runs/details/{run.run_id}",
    }


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
    params = check_parameters(cfg.parameters, pipeline_inputs(cfg.package_path()))
    client = connect(cfg)
    pipeline_id, version_id, uploaded = _upload(client, cfg)
    experiment_id = _experiment_id(client, cfg)
    with _kfp_calls(cfg.host):
        replaced = [r.recurring_run_id for r in _recurring_runs_named(client, experiment_id, cfg.name)]
        for recurring_run_id in replaced:
            client.delete_recurring_run(recurring_run_id)
        created = client.create_recurring_run(
            experiment_id,
            cfg.name,
            description=f"Managed by `e3prune schedule`: running it again replaces this recurring run ({cfg.cron}).",
            cron_expression=cfg.cron,
            max_concurrency=cfg.max_concurrency,
            no_catchup=not cfg.catchup,  # the SDK's default (None) leaves KFP's: catch up
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            enabled=cfg.enabled,
            service_account=cfg.service_account,
        )
    return {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version_id,
        "pipeline_version": cfg.version_name(),
        "upload": uploaded,
        "experiment_id": experiment_id,
        "recurring_run_id": created.recurring_run_id,
        "name": cfg.name,
        "cron": cfg.cron,
        "replaced": replaced,
        "recurring_run_url": f"{_ui(cfg)}/#/recurringrun/details/{created.recurring_run_id}",
    }
