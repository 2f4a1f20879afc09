"""Contract tests of ``e3prune submit`` / ``e3prune schedule`` against the KFP v2beta1 API.

No Kubeflow runs here, so the real kfp client (2.17) talks over HTTP to a small local server
that answers the v2beta1 endpoints it calls. The contract is what ``kfp_server_api`` (the
generated client of KFP's OpenAPI spec) defines: every request must be one of its endpoints
(paths and methods read from its sources), and every request body must deserialize into its
model (``V2beta1Run``, ``V2beta1RecurringRun``, …) with no field lost. The server's answers are
built from the same models. Plus plain unit tests of the cron conversion
(``e3prune_pipelines.cron``) and of the parameter checks.
"""

# No `from __future__ import annotations`: kfp reads the component signature below as real types.
import json
import re
import threading
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import kfp_server_api
import pytest
import yaml
from fake_http import serving
from kfp import compiler, dsl

from e3prune import __version__
from e3prune.errors import E3PruneError
from e3prune_pipelines import submit as kfp_submit
from e3prune_pipelines.cron import MACROS, cron_six_fields, kfp_cron
from e3prune_pipelines.submit import ScheduleConfig, SubmitConfig, check_parameters, pipeline_inputs

# --- the contract, read from kfp_server_api -----------------------------------------------------


def _contract_endpoints() -> list[tuple[str, re.Pattern, str]]:
    """(method, path regex, path template) of every v2beta1 endpoint kfp_server_api can call."""
    out = []
    for source in (Path(kfp_server_api.__file__).parent / "api").glob("*_api.py"):
        for template, method in re.findall(r"'(/apis/v2beta1/[^']*)', '([A-Z]+)'", source.read_text()):
            pattern = re.sub(r"\\\{[^}]*\\\}", "[^/:]+", re.escape(template))
            out.append((method, re.compile(pattern + "$"), template))
    assert len(out) > 30, "kfp_server_api's endpoints were not found; did its layout change?"
    return out


ENDPOINTS = _contract_endpoints()
# The model each request body must be, by endpoint (from the kfp_server_api signatures).
BODY_MODELS = {
    ("POST", "/apis/v2beta1/pipelines"): "V2beta1Pipeline",
    ("POST", "/apis/v2beta1/experiments"): "V2beta1Experiment",
    ("POST", "/apis/v2beta1/runs"): "V2beta1Run",
    ("POST", "/apis/v2beta1/recurringruns"): "V2beta1RecurringRun",
}
_api = kfp_server_api.ApiClient()


def to_json(model) -> dict:
    return _api.sanitize_for_serialization(model)


def from_json(body: bytes, model: str):
    return _api.deserialize(SimpleNamespace(data=body), model)


def template_of(method: str, path: str) -> str | None:
    for m, pattern, template in ENDPOINTS:
        if m == method and pattern.match(path):
            return template
    return None


# --- a KFP API server that keeps its state in dicts --------------------------------------------


class FakeKFP:
    """Answers the v2beta1 endpoints the kfp client calls for upload, experiments, runs and
    recurring runs; records every request. ``refuse`` = (status, message) answers all with that."""

    def __init__(self):
        self.requests: list[SimpleNamespace] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.packages: dict[str, tuple[str, bytes]] = {}  # version id -> uploaded (file name, bytes)
        self.refuse: tuple[int, str] | None = None
        self.lock = threading.Lock()

    # state helpers for tests
    def add_experiment(self, name: str, namespace: str | None = None) -> str:
        eid = str(uuid.uuid4())
        self.experiments[eid] = to_json(
            kfp_server_api.V2beta1Experiment(experiment_id=eid, display_name=name, namespace=namespace)
        )
        return eid

    def add_recurring_run(self, name: str, experiment_id: str) -> str:
        rid = str(uuid.uuid4())
        self.recurring_runs[rid] = to_json(
            kfp_server_api.V2beta1RecurringRun(
                recurring_run_id=rid,
                display_name=name,
                experiment_id=experiment_id,
                max_concurrency="1",
                trigger=kfp_server_api.V2beta1Trigger(
                    cron_schedule=kfp_server_api.V2beta1CronSchedule(cron="0 0 1 * * *")
                ),
            )
        )
        return rid

    def calls(self, method: str | None = None, template: str | None = None) -> list[SimpleNamespace]:
        return [r for r in self.requests if (method in (None, r.method)) and (template in (None, r.template))]

    # routing
    def create_pipeline(self, new: dict) -> tuple[int, dict]:
        if any(
            p["display_name"] == new["display_name"] and p.get("namespace") == new.get("namespace")
            for p in self.pipelines.values()
        ):
            return 409, {"error": "already exists", "message": "already exists", "code": 6}
        new["pipeline_id"] = str(uuid.uuid4())
        self.pipelines[new["pipeline_id"]] = new
        self.versions[new["pipeline_id"]] = []
        return 200, _answer("V2beta1Pipeline", new)

    def upload_version(self, q: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[int, dict]:
        pid = q["pipelineid"]
        if pid not in self.pipelines:
            return 404, {"error": "no such pipeline", "message": "no such pipeline", "code": 5}
        filename, content = files["uploadfile"]
        version = to_json(
            kfp_server_api.V2beta1PipelineVersion(
                pipeline_id=pid,
                pipeline_version_id=str(uuid.uuid4()),
                display_name=q.get("display_name") or q["name"],
                name=q["name"],
                description=q.get("description"),
                pipeline_spec=next(yaml.safe_load_all(content)),
            )
        )
        self.packages[version["pipeline_version_id"]] = (filename, content)
        self.versions[pid].append(version)
        return 200, version

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers, body: bytes):
        if self.refuse:
            return self.refuse[0], {"error": self.refuse[1], "message": self.refuse[1], "code": 7}
        q = {k: v[0] for k, v in query.items()}
        route = (method, template_of(method, path))
        segs = path.split("/")
        if route == ("GET", "/apis/v2beta1/healthz"):
            return 200, to_json(kfp_server_api.V2beta1GetHealthzResponse(multi_user=False))
        if route == ("GET", "/apis/v2beta1/pipelines"):
            found = [p for p in self.pipelines.values() if _matches(p, q) and p.get("namespace") == q.get("namespace")]
            return 200, _listing("V2beta1ListPipelinesResponse", "pipelines", "V2beta1Pipeline", found)
        if route == ("POST", "/apis/v2beta1/pipelines"):
            return self.create_pipeline(json.loads(body))
        if route == ("POST", "/apis/v2beta1/pipelines/upload_version"):
            return self.upload_version(q, _multipart(headers["Content-Type"], body))
        if route == ("GET", "/apis/v2beta1/pipelines/{pipeline_id}/versions"):
            found = [v for v in self.versions.get(segs[4], []) if _matches(v, q)]
            return 200, _listing(
                "V2beta1ListPipelineVersionsResponse", "pipeline_versions", "V2beta1PipelineVersion", found
            )
        if route == ("GET", "/apis/v2beta1/experiments"):
            ns = q.get("namespace") or None
            found = [e for e in self.experiments.values() if _matches(e, q) and e.get("namespace") == ns]
            return 200, _listing("V2beta1ListExperimentsResponse", "experiments", "V2beta1Experiment", found)
        if route == ("POST", "/apis/v2beta1/experiments"):
            new = json.loads(body)
            eid = self.add_experiment(new["display_name"], new.get("namespace") or None)
            return 200, self.experiments[eid]
        if route == ("POST", "/apis/v2beta1/runs"):
            new = {**json.loads(body), "run_id": str(uuid.uuid4()), "state": "PENDING"}
            self.runs[new["run_id"]] = new
            return 200, _answer("V2beta1Run", new)
        if route == ("GET", "/apis/v2beta1/recurringruns"):
            found = [
                r
                for r in self.recurring_runs.values()
                if _matches(r, q) and q.get("experiment_id") in (None, r["experiment_id"])
            ]
            return 200, _listing("V2beta1ListRecurringRunsResponse", "recurring_runs", "V2beta1RecurringRun", found)
        if route == ("POST", "/apis/v2beta1/recurringruns"):
            new = {**json.loads(body), "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
            self.recurring_runs[new["recurring_run_id"]] = new
            return 200, _answer("V2beta1RecurringRun", new)
        if route == ("DELETE", "/apis/v2beta1/recurringruns/{recurring_run_id}"):
            if self.recurring_runs.pop(segs[4], None) is None:
                return 404, {"error": "not found", "message": "not found", "code": 5}
            return 200, {}
        return 404, {"error": f"fake server does not answer {method} {path}", "code": 12}


def _answer(model: str, obj: dict) -> dict:
    """``obj`` as the API sends a ``model``: through the model, so with its JSON names."""
    return to_json(from_json(json.dumps(obj).encode(), model))


def _listing(model: str, attr: str, item_model: str, items: list[dict]) -> dict:
    # Built from the response model: its JSON names are not all snake_case (`recurringRuns`).
    items = [from_json(json.dumps(i).encode(), item_model) for i in items]
    return to_json(getattr(kfp_server_api, model)(**{attr: items, "total_size": len(items)}))


def _matches(obj: dict, query: dict[str, str]) -> bool:
    """KFP's filter: here only EQUALS predicates on string keys, as the client under test sends."""
    if "filter" not in query:
        return True
    for pred in json.loads(query["filter"])["predicates"]:
        assert pred["operation"] in (1, "EQUALS"), pred
        if obj.get(pred["key"]) != pred["stringValue"]:
            return False
    return True


def _same(a, b) -> bool:
    """Equal, except that an int64 may travel as a JSON string (protobuf's JSON mapping): the
    models type ``max_concurrency`` as a string while the kfp SDK sends a number."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (isinstance(a, str) and not isinstance(b, bool) and isinstance(b, int) and a == str(b))


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return {
        part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
        for part in msg.iter_parts()
    }


class _Handler(BaseHTTPRequestHandler):
    kfp: FakeKFP

    def _serve(self):
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.kfp.lock:
            self.kfp.requests.append(
                SimpleNamespace(
                    method=self.command,
                    path=url.path,
                    template=template_of(self.command, url.path),
                    query=parse_qs(url.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
            )
            status, answer = self.kfp.handle(self.command, url.path, parse_qs(url.query), self.headers, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def kfp_server():
    fake = FakeKFP()
    with serving(_Handler, kfp=fake) as fake.url:
        yield fake
    # (a) every request the client made is a real v2beta1 endpoint, (b) every body is its model
    for r in fake.requests:
        assert r.template is not None, f"{r.method} {r.path} is not a KFP v2beta1 endpoint"
        model = BODY_MODELS.get((r.method, r.template))
        if model:
            sent = json.loads(r.body)
            assert _same(to_json(from_json(r.body, model)), sent), f"{r.method} {r.path}: fields outside {model}"


@pytest.fixture(autouse=True)
def kfp_env(monkeypatch, tmp_path):
    """No endpoint, token or kfp context from the machine running the tests."""
    import kfp.client.client

    for var in (
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_TOKEN",
        "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
        "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
        "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


# --- a tiny compiled pipeline, standing in for the shipped one ---------------------------------


@dsl.component(base_image="python:3.11-slim")
def _echo(source: str, remove_ratio: float) -> str:
    return f"{source} {remove_ratio}"


@dsl.pipeline(name="tiny-e3")
def _tiny_pipeline(source: str, remove_ratio: float = 0.25):
    _echo(source=source, remove_ratio=remove_ratio)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "pipeline.yaml"
    compiler.Compiler().compile(_tiny_pipeline, str(path))
    return path


def _submit_cfg(server: FakeKFP, package: Path, **kw) -> SubmitConfig:
    return SubmitConfig.parse(host=server.url, package=str(package), parameters={"source": "hf:Qwen/Qwen3-8B"}, **kw)


def _schedule_cfg(server: FakeKFP, package: Path, **kw) -> ScheduleConfig:
    kw = {"cron": "0 3 * * *", "parameters": {"source": "hf:Qwen/Qwen3-8B"}, **kw}
    return ScheduleConfig.parse(host=server.url, package=str(package), **kw)


# --- cron -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, six",
    [
        ("0 3 * * *", "0 0 3 * * *"),
        ("*/15 * * * *", "0 */15 * * * *"),
        ("  30   2 * *  MON-FRI ", "0 30 2 * * MON-FRI"),
        ("0 3 1,15 jan-jun *", "0 0 3 1,15 jan-jun *"),
        ("0 0 3 * * *", "0 0 3 * * *"),
        ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),  # the kfp docstring's example
        ("15 10 4-20/2 * * 0", "15 10 4-20/2 * * 0"),
        ("@daily", "@daily"),
        ("@Weekly", "@weekly"),
        ("@every 6h", "@every 6h"),
        ("@every 1h30m", "@every 1h30m"),
    ],
)
def test_cron_six_fields_accepts(expr, six):
    assert cron_six_fields(expr) == six


@pytest.mark.parametrize(
    "expr, words",
    [
        ("", "empty"),
        ("0 3 * *", "4 fields"),
        ("0 0 0 3 * * *", "7 fields"),
        ("60 3 * * *", "minute: 60"),
        ("0 24 * * *", "hour: 24"),
        ("0 3 0 * *", "day of month: 0"),
        ("0 3 * 13 *", "month: 13"),
        ("0 3 * * 7", "0 = Sunday (no 7)"),
        ("0 3 * * 2025", "day of week: 2025"),
        ("61 0 3 * * *", "second: 61"),
        ("0 3 L * *", "day of month: 'L'"),
        ("0 3 * * MON#2", "day of week"),
        ("*/0 * * * *", "step '0'"),
        ("5-1 * * * *", "backwards"),
        ("? 3 * * *", "'?' is only"),
        ("0 3 1,,2 * *", "empty item"),
        ("0 3 * * FUNDAY", "day of week"),
        ("@reboot", "unknown macro"),
        ("@every", "unknown macro"),
        ("@every soon", "Go duration"),
        ("@every 500ms", "1-second"),
    ],
)
def test_cron_six_fields_rejects(expr, words):
    with pytest.raises(E3PruneError) as info:
        cron_six_fields(expr)
    assert info.value.field == "cron"
    assert str(info.value).startswith("cron: ")
    assert words in str(info.value)


CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")


@pytest.mark.parametrize("position", range(6))
def test_a_bad_field_is_named_in_six_and_five_field_form(position):
    six = ["0", "0", "3", "*", "*", "*"]
    six[position] = "99"
    with pytest.raises(E3PruneError, match=f"^cron: {CRON_FIELDS[position]}: 99 is out of range"):
        cron_six_fields(" ".join(six))
    if position:  # five fields: the same field, one place earlier; the seconds are KFP's
        with pytest.raises(E3PruneError, match=f"^cron: {CRON_FIELDS[position]}: 99 is out of range"):
            cron_six_fields(" ".join(six[1:]))


def test_every_macro_in_the_docs_is_accepted_as_is():
    """The macros docs/operations.md (Cron) lists are robfig/cron's, kept verbatim for KFP."""
    docs = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    section = docs.split("### Cron", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"`(@[a-z]+)`", section)) - {"@every", "@reboot"}
    assert listed == set(MACROS)
    for macro in MACROS:
        assert cron_six_fields(macro) == kfp_cron(macro.upper()) == macro


def test_kfp_cron_raises_value_error_for_validators():
    """``kfp_cron`` is what pydantic validators call: a plain ValueError, wrapped there as the field's error."""
    assert kfp_cron("30 4 * * 1-5") == "0 30 4 * * 1-5"
    with pytest.raises(ValueError, match="^hour: 24") as info:
        kfp_cron("0 24 * * *")
    assert not isinstance(info.value, E3PruneError)


def test_bad_cron_in_schedule_config_names_the_field(package):
    with pytest.raises(E3PruneError) as info:
        ScheduleConfig.parse(host="http://kfp:8888", package=str(package), cron="0 3 * *", parameters={"source": "x"})
    assert info.value.field == "cron" and "five fields" in str(info.value)


# --- parameters and settings --------------------------------------------------------------------


def test_pipeline_inputs_read_from_the_compiled_yaml(package):
    inputs = pipeline_inputs(package)
    assert sorted(inputs) == ["remove_ratio", "source"]
    assert inputs["remove_ratio"]["parameterType"] == "NUMBER_DOUBLE"


def test_unknown_parameter_is_named_with_the_allowed_ones(package):
    with pytest.raises(E3PruneError) as info:
        SubmitConfig.parse(host="http://kfp:8888", package=str(package), parameters={"source": "x", "sorce": "y"})
    assert info.value.field == "parameters.sorce"
    assert "allowed: remove_ratio, source" in str(info.value)


def test_missing_required_parameter_and_types(package):
    inputs = pipeline_inputs(package)
    with pytest.raises(E3PruneError) as info:
        check_parameters({"remove_ratio": 0.3}, inputs)
    assert info.value.field == "parameters.source" and "--param source=VALUE" in str(info.value)
    # strings from --param are converted to the declared types
    assert check_parameters({"source": "x", "remove_ratio": "0.5"}, inputs) == {"source": "x", "remove_ratio": 0.5}
    with pytest.raises(E3PruneError) as info:
        check_parameters({"source": "x", "remove_ratio": "half"}, inputs)
    assert info.value.field == "parameters.remove_ratio" and "a number" in str(info.value)
    kinds = {
        "i": {"parameterType": "NUMBER_INTEGER"},
        "b": {"parameterType": "BOOLEAN"},
        "l": {"parameterType": "LIST"},
        "s": {"parameterType": "STRUCT"},
    }
    got = check_parameters({"i": "3", "b": "True", "l": "[1, 2]", "s": '{"a": 1}'}, kinds)
    assert got == {"i": 3, "b": True, "l": [1, 2], "s": {"a": 1}}
    for key, bad in (("i", "3.5"), ("b", "yes"), ("l", '{"a": 1}'), ("s", "[1]")):
        with pytest.raises(E3PruneError, match=f"parameters.{key}"):
            check_parameters({key: bad}, kinds)


@pytest.mark.parametrize(
    "ptype, value, want",
    [
        ("STRING", True, "true"),  # a YAML boolean given for a string parameter
        ("STRING", 3, "3"),
        ("STRING", [1], None),
        ("NUMBER_INTEGER", 3.0, 3),
        ("NUMBER_INTEGER", True, None),
        ("NUMBER_INTEGER", "x", None),
        ("NUMBER_DOUBLE", 2, 2.0),
        ("NUMBER_DOUBLE", False, None),
        ("BOOLEAN", False, False),
        ("BOOLEAN", "FALSE", False),
        ("BOOLEAN", 1, None),
        ("LIST", [1, 2], [1, 2]),
        ("STRUCT", "not json", None),
        ("TASK_FINAL_STATUS", {"any": "thing"}, {"any": "thing"}),  # unknown here: passed as given
    ],
)
def test_parameter_values_from_yaml_are_coerced_or_refused(ptype, value, want):
    inputs = {"p": {"parameterType": ptype}}
    if want is None:
        with pytest.raises(E3PruneError, match="^parameters.p: must be "):
            check_parameters({"p": value}, inputs)
    else:
        got = check_parameters({"p": value}, inputs)["p"]
        assert got == want and type(got) is type(want)


def test_settings_errors(package, monkeypatch, tmp_path):
    with pytest.raises(E3PruneError) as info:
        SubmitConfig.parse(package=str(package), parameters={"source": "x"})
    assert info.value.field == "host" and "KF_PIPELINES_ENDPOINT" in str(info.value)
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", "http://ml-pipeline.kubeflow:8888/")
    assert (
        SubmitConfig.parse(package=str(package), parameters={"source": "x"}).host == "http://ml-pipeline.kubeflow:8888"
    )
    assert SubmitConfig.parse(host="", package=str(package), parameters={"source": "x"}).host.endswith(":8888")
    with pytest.raises(E3PruneError, match="^host: "):
        SubmitConfig.parse(host="ml-pipeline:8888", package=str(package), parameters={"source": "x"})
    with pytest.raises(E3PruneError, match="^max_concurrency: "):
        ScheduleConfig.parse(package=str(package), cron="@daily", max_concurrency=11, parameters={"source": "x"})
    with pytest.raises(E3PruneError, match="^package: .*does not exist"):
        SubmitConfig.parse(package=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "schedule.yaml"
    bad.write_text("cron: '@daily'\nschedule: nightly\n")
    with pytest.raises(E3PruneError) as info:
        ScheduleConfig.from_yaml(bad, package=str(package), parameters={"source": "x"})
    assert info.value.field == "schedule" and "unknown setting" in str(info.value)


def test_default_version_follows_the_package_contents(package, tmp_path):
    a = SubmitConfig.parse(host="http://kfp:8888", package=str(package), parameters={"source": "x"})
    copy = tmp_path / "copy.yaml"
    copy.write_bytes(package.read_bytes())
    b = SubmitConfig.parse(host="http://kfp:8888", package=str(copy), parameters={"source": "x"})
    assert a.version_name() == b.version_name()
    assert re.fullmatch(re.escape(__version__) + r"-[0-9a-f]{12}", a.version_name())
    copy.write_bytes(package.read_bytes() + b"# changed\n")
    assert b.version_name() != a.version_name()
    assert a.model_copy(update={"pipeline_version": "v7"}).version_name() == "v7"


def test_docs_schedule_example_is_valid_for_the_shipped_pipeline():
    """The schedule.yaml in docs/operations.md (the Helm Job's contract) parses, and its
    parameters are parameters of the shipped compiled pipeline (the default package)."""
    docs = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    section = docs.split("## Submitting and scheduling", 1)[1]
    example = re.search(r"```yaml\n# /etc/e3-pruner/schedule.yaml\n(.*?)```", section, re.S).group(1)
    data = yaml.safe_load(example)
    cfg = ScheduleConfig.parse(data)
    assert cfg.package_path() == kfp_submit.default_package()
    assert cfg.cron == cron_six_fields(data["cron"]) == "0 0 3 * * *"
    assert cfg.parameters == data["parameters"]


# --- the contract tests proper ------------------------------------------------------------------


def test_submit_uploads_creates_experiment_and_run(kfp_server, package):
    cfg = _submit_cfg(kfp_server, package, run_name="nightly check", namespace="team-a")
    out = kfp_submit.submit(cfg)

    creates = kfp_server.calls("POST")
    assert [r.template for r in creates] == [
        "/apis/v2beta1/pipelines",
        "/apis/v2beta1/pipelines/upload_version",
        "/apis/v2beta1/experiments",
        "/apis/v2beta1/runs",
    ]
    pipeline = from_json(creates[0].body, "V2beta1Pipeline")
    assert (pipeline.display_name, pipeline.namespace) == ("e3-pruner", "team-a")
    up = creates[1]
    assert up.query["name"] == [cfg.version_name()] and up.query["pipelineid"] == [out["pipeline_id"]]
    filename, content = _multipart(up.headers["content-type"], up.body)["uploadfile"]
    assert filename == "pipeline.yaml" and content == package.read_bytes()
    experiment = from_json(creates[2].body, "V2beta1Experiment")
    assert (experiment.display_name, experiment.namespace) == ("e3-pruner", "team-a")
    run = from_json(creates[3].body, "V2beta1Run")
    assert run.display_name == "nightly check"
    assert run.experiment_id == out["experiment_id"]
    assert run.pipeline_spec is None  # runs the uploaded version, not an inline copy
    assert run.pipeline_version_reference.pipeline_id == out["pipeline_id"]
    assert run.pipeline_version_reference.pipeline_version_id == out["pipeline_version_id"]
    assert run.runtime_config.parameters == {"source": "hf:Qwen/Qwen3-8B"}
    # lookups were scoped to the namespace
    assert all(r.query.get("namespace") == ["team-a"] for r in kfp_server.calls("GET", "/apis/v2beta1/pipelines"))
    assert out["run_id"] in kfp_server.runs
    assert out["run_url"] == f"{kfp_server.url}/#/runs/details/{out['run_id']}"
    assert out["upload"] == f"created pipeline 'e3-pruner' version '{cfg.version_name()}'"


def test_upload_is_idempotent(kfp_server, package, tmp_path):
    import kfp

    cfg = _submit_cfg(kfp_server, package)
    client = kfp_submit.connect(cfg)
    first = kfp_submit.upload(client, cfg)
    n = len(kfp_server.requests)
    assert kfp_submit.upload(client, cfg) == first  # same YAML: nothing uploaded
    assert not [r for r in kfp_server.requests[n:] if r.method != "GET"]
    assert isinstance(client, kfp.Client)

    changed = tmp_path / "pipeline.yaml"
    changed.write_bytes(package.read_bytes() + b"# changed\n")
    cfg2 = cfg.model_copy(update={"package": str(changed)})
    pid, vid = kfp_submit.upload(client, cfg2)
    assert pid == first[0] and vid != first[1]  # a new version of the same pipeline
    assert len(kfp_server.calls("POST", "/apis/v2beta1/pipelines")) == 1
    assert len(kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload_version")) == 2
    assert [v["name"] for v in kfp_server.versions[pid]] == [cfg.version_name(), cfg2.version_name()]
    # an explicit version name that exists is reused, whatever the contents
    cfg3 = cfg2.model_copy(update={"pipeline_version": cfg.version_name()})
    assert kfp_submit.upload(client, cfg3) == first


def test_upload_racing_another_upload(kfp_server, package, monkeypatch):
    """A pipeline created between the lookup and the create (two Jobs at once): the 409 is
    answered by using the pipeline that won."""
    cfg = _submit_cfg(kfp_server, package)
    client = kfp_submit.connect(cfg)
    won = kfp_server.handle("POST", "/apis/v2beta1/pipelines", {}, {}, b'{"display_name": "e3-pruner"}')[1]
    real, calls = kfp_submit._find_pipeline, []

    def stale_first(client, cfg):
        calls.append(1)
        return None if len(calls) == 1 else real(client, cfg)

    monkeypatch.setattr(kfp_submit, "_find_pipeline", stale_first)
    pid, vid = kfp_submit.upload(client, cfg)
    assert pid == won["pipeline_id"] and len(kfp_server.pipelines) == 1
    assert len(kfp_server.calls("POST", "/apis/v2beta1/pipelines")) == 1  # answered 409
    assert [v["pipeline_version_id"] for v in kfp_server.versions[pid]] == [vid]


def test_schedule_creates_the_recurring_run(kfp_server, package):
    out = kfp_submit.schedule(_schedule_cfg(kfp_server, package, name="nightly"))

    assert not kfp_server.calls("DELETE")
    (create,) = kfp_server.calls("POST", "/apis/v2beta1/recurringruns")
    rr = from_json(create.body, "V2beta1RecurringRun")
    assert rr.display_name == "nightly"
    assert rr.trigger.cron_schedule.cron == "0 0 3 * * *"
    assert rr.trigger.periodic_schedule is None
    assert int(rr.max_concurrency) == 1
    assert rr.no_catchup is True
    assert rr.mode == "ENABLE"
    assert rr.experiment_id == out["experiment_id"]
    assert rr.pipeline_version_reference.pipeline_id == out["pipeline_id"]
    assert rr.pipeline_version_reference.pipeline_version_id == out["pipeline_version_id"]
    assert rr.runtime_config.parameters == {"source": "hf:Qwen/Qwen3-8B"}
    assert out["replaced"] == [] and out["cron"] == "0 0 3 * * *"
    assert out["recurring_run_url"].endswith(f"/#/recurringrun/details/{out['recurring_run_id']}")


def test_schedule_replaces_a_recurring_run_of_the_same_name(kfp_server, package):
    exp = kfp_server.add_experiment("e3-pruner")
    other_exp = kfp_server.add_experiment("someone-else")
    old = kfp_server.add_recurring_run("nightly", exp)
    keep_other_name = kfp_server.add_recurring_run("weekly", exp)
    keep_other_exp = kfp_server.add_recurring_run("nightly", other_exp)

    cfg = _schedule_cfg(
        kfp_server, package, name="nightly", cron="@every 12h", max_concurrency=2, catchup=True, enabled=False
    )
    out = kfp_submit.schedule(cfg)

    writes = [(r.method, r.template) for r in kfp_server.requests if r.method in ("DELETE", "POST")]
    i = writes.index(("DELETE", "/apis/v2beta1/recurringruns/{recurring_run_id}"))
    assert writes[i + 1 :] == [("POST", "/apis/v2beta1/recurringruns")]  # a DELETE, then the CREATE
    assert [r.path.rsplit("/", 1)[1] for r in kfp_server.calls("DELETE")] == [old]
    assert out["replaced"] == [old] and out["experiment_id"] == exp
    named = [r for r in kfp_server.recurring_runs.values() if r["display_name"] == "nightly"]
    assert sorted(r["experiment_id"] for r in named) == sorted([exp, other_exp])  # one per experiment
    assert {keep_other_name, keep_other_exp} <= set(kfp_server.recurring_runs)
    rr = from_json(kfp_server.calls("POST", "/apis/v2beta1/recurringruns")[0].body, "V2beta1RecurringRun")
    assert (rr.trigger.cron_schedule.cron, int(rr.max_concurrency), rr.no_catchup, rr.mode) == (
        "@every 12h",
        2,
        False,
        "DISABLE",
    )
    # running it again replaces the one just made: still one
    again = kfp_submit.schedule(cfg)
    assert again["replaced"] == [out["recurring_run_id"]]
    assert [r["experiment_id"] for r in kfp_server.recurring_runs.values() if r["display_name"] == "nightly"].count(
        exp
    ) == 1


def test_schedule_the_shipped_pipeline(kfp_server):
    """The default package: --param strings reach KFP with the pipeline's declared types."""
    cfg = ScheduleConfig.parse(
        host=kfp_server.url,
        cron="@daily",
        parameters={"source_model": "Qwen/Qwen3-8B", "remove_ratio": "0.4", "top_k": "20", "allow_repeat": "true"},
    )
    out = kfp_submit.schedule(cfg)
    rr = from_json(kfp_server.calls("POST", "/apis/v2beta1/recurringruns")[0].body, "V2beta1RecurringRun")
    assert rr.runtime_config.parameters == {
        "source_model": "Qwen/Qwen3-8B",
        "remove_ratio": 0.4,
        "top_k": 20,
        "allow_repeat": True,
    }
    assert kfp_server.packages[out["pipeline_version_id"]][1] == kfp_submit.default_package().read_bytes()


def test_credentials_service_account_token_then_env_token(kfp_server, package, tmp_path, monkeypatch, capsys):
    sa = tmp_path / "sa-token"
    sa.write_text("sa-tok-1f3e\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(sa))
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "env-tok-9a7c")
    out = kfp_submit.submit(_submit_cfg(kfp_server, package))
    assert {r.headers.get("authorization") for r in kfp_server.requests} == {"Bearer sa-tok-1f3e"}
    sa.unlink()
    kfp_server.requests.clear()
    kfp_submit.submit(_submit_cfg(kfp_server, package))
    assert {r.headers.get("authorization") for r in kfp_server.requests} == {"Bearer env-tok-9a7c"}
    monkeypatch.delenv("KF_PIPELINES_TOKEN")
    kfp_server.requests.clear()
    kfp_submit.submit(_submit_cfg(kfp_server, package))
    assert {r.headers.get("authorization") for r in kfp_server.requests} == {None}
    printed = capsys.readouterr()
    for text in (printed.out, printed.err, json.dumps(out), json.dumps(kfp_server.runs)):
        assert "sa-tok" not in text and "env-tok" not in text


def test_refusals_become_one_error(kfp_server, package, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "env-tok-5d2b")
    kfp_server.refuse = (403, "namespace team-a: access denied")
    with pytest.raises(E3PruneError) as info:
        kfp_submit.submit(_submit_cfg(kfp_server, package, namespace="team-a"))
    assert info.value.field == "host"
    assert "403" in str(info.value) and "access denied" in str(info.value) and "env-tok" not in str(info.value)

    cfg = _submit_cfg(kfp_server, package).model_copy(update={"host": "http://127.0.0.1:9"})
    with pytest.raises(E3PruneError, match="^host: cannot reach the KFP API at http://127.0.0.1:9"):
        kfp_submit.submit(cfg)


def test_cli_schedule_and_submit(kfp_server, package, tmp_path, capsys):
    from e3prune.cli import main

    config = tmp_path / "schedule.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "host": "http://unused.invalid:1",
                "package": str(package),
                "name": "nightly",
                "cron": "0 2 * * *",
                "parameters": {"source": "hf:a/b", "remove_ratio": 0.25},
            }
        )
    )
    exp = kfp_server.add_experiment("e3-pruner")
    old = kfp_server.add_recurring_run("nightly", exp)
    args = ["schedule", "--config", str(config), "--host", kfp_server.url, "--cron", "30 4 * * 1-5"]
    assert main([*args, "--param", "remove_ratio=0.5"]) == 0
    out = capsys.readouterr().out
    assert f"replaced existing recurring run {old}" in out
    rr = from_json(kfp_server.calls("POST", "/apis/v2beta1/recurringruns")[0].body, "V2beta1RecurringRun")
    assert rr.trigger.cron_schedule.cron == "0 30 4 * * 1-5"
    assert rr.runtime_config.parameters == {"source": "hf:a/b", "remove_ratio": 0.5}
    assert rr.recurring_run_id is None and "0 30 4 * * 1-5" in out

    assert main(["submit", "--config", str(config), "--host", kfp_server.url, "--name", "one-off"]) == 2
    err = capsys.readouterr().err  # schedule keys in a submit config
    assert err.startswith("error: ") and "name: unknown setting" in err and "cron: unknown setting" in err
    config.write_text(yaml.safe_dump({"package": str(package), "parameters": {"source": "hf:a/b"}}))
    assert main(["submit", "--config", str(config), "--host", kfp_server.url, "--name", "one-off"]) == 0
    out = capsys.readouterr().out
    (run,) = kfp_server.runs.values()
    assert run["display_name"] == "one-off" and f"/#/runs/details/{run['run_id']}" in out

    assert main(["schedule", "--config", str(config), "--host", kfp_server.url, "--cron", "0 3 * *"]) == 2
    assert "error: cron: " in capsys.readouterr().err
    assert main([*args, "--param", "nope=1"]) == 2
    assert "error: parameters.nope: " in capsys.readouterr().err
