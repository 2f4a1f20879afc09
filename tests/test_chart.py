"""The Helm chart `charts/e3-pruner`: lint, render, Kubernetes-schema validation, contracts.

No `helm` binary and no cluster: `helm_python` (the `helm-python-sdk` wheel) runs Helm's own Go
library (lint, values-schema check, template rendering) in-process, offline; `kubernetes_validate`
checks every rendered object against the OpenAPI-derived JSON schemas of a pinned Kubernetes
release, in strict mode (unknown fields are errors).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import e3prune

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "e3-pruner"
SAMPLE = CHART / "ci" / "sample-values.yaml"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "e3", "mlops"
MLFLOW_SVC = "e3-e3-pruner-mlflow"
TRACKING_URI = f"http://{MLFLOW_SVC}.{NAMESPACE}.svc.cluster.local:5000"
PIPELINE = ROOT / "pipelines" / "e3_pruner" / "cluster.py"  # where the Secret and ConfigMap are named
PIPELINE_NS = "kubeflow-user-example-com"  # kfp.namespace of the sample values
# The keys `e3prune schedule --config` accepts (docs/operations.md, "The settings file"); it refuses others.
SCHEDULE_KEYS = {
    "host", "namespace", "pipeline_name", "pipeline_version", "experiment", "package", "service_account",
    "parameters", "run_name", "name", "cron", "max_concurrency", "catchup", "enabled",
}  # fmt: skip


def sample_values() -> dict:
    return yaml.safe_load(SAMPLE.read_text())


VALUE_SETS = {"default": {}, "sample": sample_values()}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict | None = None) -> dict[str, str]:
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def schedule_configmap(docs: list[dict]) -> dict:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-schedules")]
    return cm


def pipeline_env(docs: list[dict]) -> list[dict]:
    return [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "e3-pruner-env"]


def pipeline_constant(name: str) -> str:
    """A name fixed at compile time in the pipeline (read from the source: no kfp import needed)."""
    (value,) = re.findall(rf'^{name} = "([^"]+)"', PIPELINE.read_text(), flags=re.M)
    return value


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    ]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered(chart):
    return {name: objects(render(chart, values)) for name, values in VALUE_SETS.items()}


# ---------------------------------------------------------------- lint, render, validate


def test_chart_metadata_matches_the_package():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["version"] == "0.1.0"
    # The schedule Job's default image tag is `<appVersion>-cpu`: it must name this release's image.
    assert meta["appVersion"] == e3prune.__version__


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_helm_lint_strict_passes(which):
    report = helm.lint(CHART, VALUE_SETS[which], strict=True, kube_version=f"v{KUBE_VERSION}", namespace=NAMESPACE)
    assert report["errors"] == [], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert problems == [], problems


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_rendered_manifests_validate_against_kubernetes_schemas(rendered, which):
    docs = rendered[which]
    assert docs
    for doc in docs:
        # Strict: an unknown or misplaced field is an error, not silently dropped by the API server.
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert doc["metadata"]["labels"]["helm.sh/chart"] == "e3-pruner-0.1.0"
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_default_and_sample_render_the_expected_objects(rendered):
    kinds = lambda docs: sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)  # noqa: E731
    assert kinds(rendered["default"]) == [
        "ConfigMap/e3-pruner-env",
        f"Deployment/{MLFLOW_SVC}",
        f"Service/{MLFLOW_SVC}",
        f"ServiceAccount/{MLFLOW_SVC}",
        "ServiceAccount/e3-e3-pruner-scheduler",
    ]
    assert kinds(rendered["sample"]) == sorted(
        kinds(rendered["default"])
        + [
            "ConfigMap/e3-e3-pruner-schedules",
            "Job/e3-e3-pruner-qwen3-8b-nightly",
            "Job/e3-e3-pruner-llama-3-1-8b-weekly",
            "RoleBinding/e3-e3-pruner-kfp",
            "Role/e3-e3-pruner-trainjobs",
            "RoleBinding/e3-e3-pruner-trainjobs",
            f"ClusterRole/e3-e3-pruner-trainjobs-{PIPELINE_NS}",
            f"ClusterRoleBinding/e3-e3-pruner-trainjobs-{PIPELINE_NS}",
        ]
    )


def _allows(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_trainer_rbac_lets_the_pipeline_runs_submit_and_follow_trainjobs(rendered):
    """What e3prune.trainjob does through the kubeflow SDK (tests/test_trainjob.py serves exactly
    these calls): every one is allowed to the runs' ServiceAccount in their namespace."""
    docs = rendered["sample"]
    role = next(d for d in by_kind(docs, "Role") if d["metadata"]["name"] == "e3-e3-pruner-trainjobs")
    binding = next(d for d in by_kind(docs, "RoleBinding") if d["metadata"]["name"] == "e3-e3-pruner-trainjobs")
    (cluster_role,) = by_kind(docs, "ClusterRole")
    (cluster_binding,) = by_kind(docs, "ClusterRoleBinding")
    runner = [{"kind": "ServiceAccount", "name": "default-editor", "namespace": PIPELINE_NS}]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == PIPELINE_NS
    assert binding["subjects"] == cluster_binding["subjects"] == runner
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert cluster_binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    for group, resource, verb in [
        ("trainer.kubeflow.org", "trainjobs", "create"),
        ("trainer.kubeflow.org", "trainjobs", "get"),
        ("trainer.kubeflow.org", "trainjobs", "delete"),
        ("trainer.kubeflow.org", "trainingruntimes", "get"),
        ("", "pods", "list"),
        ("", "pods/log", "get"),
    ]:
        assert _allows(role["rules"], group, resource, verb), (resource, verb)
    assert _allows(cluster_role["rules"], "trainer.kubeflow.org", "clustertrainingruntimes", "get")
    assert not _allows(cluster_role["rules"], "trainer.kubeflow.org", "trainjobs", "create")  # namespaced only
    assert not [d for d in rendered["default"] if d["kind"] in ("Role", "ClusterRole")]  # off by default


# ---------------------------------------------------------------- security and resources


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_every_container_is_non_root_hardened_and_has_resources(rendered, which):
    specs = pod_specs(rendered[which])
    assert specs
    for where, spec in specs:
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert isinstance(pod_sc["runAsUser"], int) and pod_sc["runAsUser"] > 0, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            requests = c["resources"]["requests"]
            assert requests.get("cpu") and requests.get("memory"), (where, c["name"])
            assert c["resources"]["limits"].get("memory"), (where, c["name"])
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            # A read-only root needs a writable /tmp, and HOME pointing into it.
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, (where, c["name"])
            assert env_of(c)["HOME"]["value"] == "/tmp", (where, c["name"])


SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|KEY_ID|TOKEN$")


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_no_plaintext_credentials(rendered, which):
    docs = rendered[which]
    assert by_kind(docs, "Secret") == []  # the chart only refers to existing Secrets
    for cm in by_kind(docs, "ConfigMap"):
        assert not any(SECRET_NAME.search(k) for k in cm["data"]), cm["metadata"]["name"]
    for where, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for name, e in env_of(c).items():
                if SECRET_NAME.search(name):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (where, c["name"], name)
            uri = env_of(c).get("MLFLOW_BACKEND_STORE_URI")
            if uri and "value" in uri:  # composed URI: the password only as a $(VAR) reference
                assert ":$(MLFLOW_DB_PASSWORD)@" in uri["value"], uri
            # nothing credential-like on a command line either
            assert not any("://" in a and "@" in a for a in c.get("args", []) + c.get("command", [])), c


@pytest.mark.parametrize(
    "values, message",
    [
        ({"s3": {"secretAccessKey": "AKIA-not-here"}}, "secretAccessKey"),
        ({"mlflow": {"database": {"password": "hunter2"}}}, "password"),
    ],
    ids=["s3-key", "db-password"],
)
def test_schema_refuses_credentials_in_values(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        render(chart, values)


# ---------------------------------------------------------------- MLflow server


def mlflow_container(docs: list[dict]) -> tuple[dict, dict]:
    (deploy,) = by_kind(docs, "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def test_mlflow_server_defaults(rendered):
    spec, c = mlflow_container(rendered["default"])
    assert c["image"] == "ghcr.io/mlflow/mlflow:v3.17.2-full"
    assert c["command"] == ["mlflow", "server"]
    args = c["args"]
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://mlflow-artifacts" in args
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {f"{MLFLOW_SVC}.{NAMESPACE}.svc.cluster.local:*", f"{MLFLOW_SVC}:*", "localhost:*", "10.*"} <= set(allowed)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    env = env_of(c)
    # default: the whole URI from the existing Secret
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "e3-pruner-mlflow-db", "key": "uri"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "e3-pruner-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert "MLFLOW_S3_ENDPOINT_URL" not in env  # AWS S3 by default
    (init,) = spec["initContainers"]
    assert init["name"] == "db-upgrade"
    assert init["command"] == ["mlflow", "db", "upgrade", "$(MLFLOW_BACKEND_STORE_URI)"]
    assert env_of(init)["MLFLOW_BACKEND_STORE_URI"] == env["MLFLOW_BACKEND_STORE_URI"]
    (svc,) = by_kind(rendered["default"], "Service")
    assert svc["spec"]["ports"][0]["port"] == 5000
    (deploy,) = by_kind(rendered["default"], "Deployment")
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


def test_mlflow_accepts_the_service_names_and_refuses_others(rendered, monkeypatch):
    """The rendered --allowed-hosts, read by MLflow's own code as `mlflow server` does."""
    from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header

    _, c = mlflow_container(rendered["sample"])
    (arg,) = [a for a in c["args"] if a.startswith("--allowed-hosts=")]
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", arg.split("=", 1)[1])  # what the CLI does with the flag
    allowed = get_allowed_hosts_from_env()
    for host in [
        f"{MLFLOW_SVC}.{NAMESPACE}.svc.cluster.local:5000",  # pipeline pods in the profile namespace
        f"{MLFLOW_SVC}.{NAMESPACE}.svc.cluster.local",
        f"{MLFLOW_SVC}.{NAMESPACE}:5000",
        f"{MLFLOW_SVC}:5000",  # same namespace
        "localhost:5000",  # kubectl port-forward
        "[::1]:5000",
        "10.12.0.7:5000",  # pod IPs
        "172.20.1.1:5000",
        "mlflow.example.com",  # mlflow.allowedHosts
    ]:
        assert is_allowed_host_header(allowed, host), host
    for host in ["evil.example.com", f"{MLFLOW_SVC}.other-namespace:5000", "172.32.0.1:5000", "8.8.8.8:5000"]:
        assert not is_allowed_host_header(allowed, host), host


def test_mlflow_server_with_sample_values(rendered):
    spec, c = mlflow_container(rendered["sample"])
    env = env_of(c)
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        "postgresql+psycopg2://mlflow:$(MLFLOW_DB_PASSWORD)@postgres-rw.databases.svc.cluster.local:5432/mlflow?sslmode=require"
    )
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    names = [e["name"] for e in c["env"]]
    assert names.index("MLFLOW_DB_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    assert (
        env["MLFLOW_S3_ENDPOINT_URL"]["value"]
        == env["AWS_ENDPOINT_URL"]["value"]
        == "http://minio.minio.svc.cluster.local:9000"
    )
    assert "--artifacts-destination=s3://mlflow-artifacts/e3-pruner" in c["args"]
    assert "--workers=4" in c["args"]
    assert c["args"][-1].endswith(",mlflow.example.com")
    assert spec["tolerations"][0]["key"] == "dedicated" and spec["nodeSelector"]


def test_mysql_uri_with_user_from_the_secret(chart):
    db = {"host": "mysql.db", "dialect": "mysql", "userKey": "username", "existingSecret": "db"}
    docs = objects(render(chart, {"mlflow": {"database": db}}))
    env = env_of(mlflow_container(docs)[1])
    assert env["MLFLOW_DB_USER"]["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "username"}
    assert (
        env["MLFLOW_BACKEND_STORE_URI"]["value"]
        == "mysql+pymysql://$(MLFLOW_DB_USER):$(MLFLOW_DB_PASSWORD)@mysql.db:3306/mlflow"
    )


def test_mlflow_can_be_left_out_for_an_external_server(chart):
    values = copy.deepcopy(VALUE_SETS["sample"])
    values["mlflow"] = {"enabled": False, "externalTrackingUri": "https://mlflow.example.com"}
    docs = objects(render(chart, values))
    assert by_kind(docs, "Deployment") == [] and by_kind(docs, "Service") == []
    for job in by_kind(docs, "Job"):
        (c,) = job["spec"]["template"]["spec"]["containers"]
        assert env_of(c)["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.com"
    with pytest.raises(helm.HelmValuesError, match="externalTrackingUri"):
        render(chart, {"mlflow": {"enabled": False}})
    # Credentials in the URI would sit in plain text in a ConfigMap and every pod's env.
    with pytest.raises(helm.HelmValuesError, match="externalTrackingUri"):
        render(
            chart, {**values, "mlflow": {"enabled": False, "externalTrackingUri": "https://u:pw@mlflow.example.com"}}
        )


# ---------------------------------------------------------------- schedule ConfigMap and Jobs


def test_schedule_configmap_holds_one_config_per_schedule(rendered):
    values = VALUE_SETS["sample"]
    cm = schedule_configmap(rendered["sample"])
    assert sorted(cm["data"]) == sorted(f"{s['name']}.yaml" for s in values["schedules"])
    defaults = values["scheduleDefaults"]
    for s in values["schedules"]:
        config = yaml.safe_load(cm["data"][f"{s['name']}.yaml"])
        assert set(config) <= SCHEDULE_KEYS
        assert config["host"] == values["kfp"]["host"]
        assert config["namespace"] == values["kfp"]["namespace"]
        assert config["name"] == s["name"]
        assert config["cron"] == s.get("cron", defaults["cron"])
        assert config["experiment"] == s.get("experiment", defaults["experiment"])
        assert config["max_concurrency"] == 1 and config["catchup"] is False
        # the pipeline's steps log to this chart's MLflow server
        assert config["parameters"] == {
            **defaults["parameters"],
            **s["parameters"],
            "mlflow_tracking_uri": TRACKING_URI,
        }
        assert config.get("service_account") == s.get("service_account")
    weekly = yaml.safe_load(cm["data"]["llama-3-1-8b-weekly.yaml"])
    assert weekly["cron"] == "0 30 4 * * 0" and weekly["parameters"]["remove_ratio"] == 0.2


def test_a_schedule_can_turn_a_default_off(chart):
    values = {
        "scheduleDefaults": {"catchup": True, "parameters": {"allow_repeat": True, "lm_eval_tasks": "arc_easy"}},
        "schedules": [
            {
                "name": "a",
                "catchup": False,
                "namespace": "team-a",
                "enabled": False,
                "parameters": {"allow_repeat": False, "lm_eval_tasks": None},  # null: back to the pipeline's default
            },
            {"name": "b", "parameters": {"mlflow_tracking_uri": "https://mlflow.example.com"}},
        ],
    }
    cm = schedule_configmap(objects(render(chart, values)))
    config = yaml.safe_load(cm["data"]["a.yaml"])
    assert config["catchup"] is False and config["enabled"] is False
    assert config["parameters"] == {"allow_repeat": False, "mlflow_tracking_uri": TRACKING_URI}
    assert config["namespace"] == "team-a"
    # a schedule's own tracking URI wins; trackingUriParameter="" leaves the parameters alone
    assert yaml.safe_load(cm["data"]["b.yaml"])["parameters"] == {
        "allow_repeat": True,
        "lm_eval_tasks": "arc_easy",
        "mlflow_tracking_uri": "https://mlflow.example.com",
    }
    cm = schedule_configmap(objects(render(chart, {**values, "job": {"trackingUriParameter": ""}})))
    assert yaml.safe_load(cm["data"]["a.yaml"])["parameters"] == {"allow_repeat": False}


def test_schedule_jobs(rendered):
    values = VALUE_SETS["sample"]
    jobs = by_kind(rendered["sample"], "Job")
    assert [j["metadata"]["labels"]["e3-pruner/schedule"] for j in jobs] == [s["name"] for s in values["schedules"]]
    for i, job in enumerate(jobs):
        name = job["metadata"]["labels"]["e3-pruner/schedule"]
        ann = job["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == "post-install,post-upgrade"
        assert ann["helm.sh/hook-weight"] == str(i)  # Helm runs them one after the other
        assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"]
        assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] == 604800
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == "e3-e3-pruner-scheduler"
        (c,) = spec["containers"]
        assert c["image"] == "registry.example.com/ml/e3-pruner:0.1.0-cpu"
        assert c["command"] == ["e3prune", "schedule", "--config", "/etc/e3-pruner/schedule.yaml"]
        env = env_of(c)
        assert env["KF_PIPELINES_SA_TOKEN_PATH"]["value"] == "/var/run/secrets/kubeflow/pipelines/token"
        assert env["MLFLOW_TRACKING_URI"]["value"] == TRACKING_URI
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "e3-pruner-s3"
        assert env["AWS_ENDPOINT_URL"]["value"] == env["MLFLOW_S3_ENDPOINT_URL"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["kfp-token"] == "/var/run/secrets/kubeflow/pipelines"
        (source,) = volumes["kfp-token"]["projected"]["sources"]
        assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
        assert source["serviceAccountToken"]["path"] == "token"
        assert mounts["config"] == "/etc/e3-pruner"
        assert volumes["config"]["configMap"]["items"] == [{"key": f"{name}.yaml", "path": "schedule.yaml"}]
    (rb,) = [d for d in by_kind(rendered["sample"], "RoleBinding") if d["metadata"]["name"] == "e3-e3-pruner-kfp"]
    assert rb["metadata"]["namespace"] == "kubeflow-user-example-com"
    assert rb["roleRef"]["name"] == "kubeflow-edit"
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "e3-e3-pruner-scheduler", "namespace": NAMESPACE}]


def test_default_image_tag_is_the_cpu_image_of_the_chart_version(chart):
    docs = objects(render(chart, {"schedules": [{"name": "x", "parameters": {}}]}))
    (job,) = by_kind(docs, "Job")
    assert (
        job["spec"]["template"]["spec"]["containers"][0]["image"]
        == f"ghcr.io/e3-pruner/e3-pruner:{e3prune.__version__}-cpu"
    )


def test_plain_jobs_are_named_by_their_configuration(chart):
    values = copy.deepcopy(VALUE_SETS["sample"])
    values["job"]["useHooks"] = False
    first = by_kind(objects(render(chart, values)), "Job")
    assert all("helm.sh/hook" not in j["metadata"]["annotations"] for j in first)
    names = [j["metadata"]["name"] for j in first]
    assert all(re.fullmatch(r"e3-e3-pruner-[a-z0-9-]+-[0-9a-f]{8}", n) and len(n) <= 63 for n in names), names
    for doc in first:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    values["schedules"][1]["parameters"]["remove_ratio"] = 0.3
    second = [j["metadata"]["name"] for j in by_kind(objects(render(chart, values)), "Job")]
    assert second[0] == names[0] and second[1] != names[1]  # only the changed schedule gets a new Job


def test_duplicate_schedule_names_fail(chart):
    values = {"schedules": [{"name": "a", "parameters": {}}, {"name": "a", "parameters": {}}]}
    with pytest.raises(helm.HelmError, match="used twice"):
        render(chart, values)


# ---------------------------------------------------------------- pipeline environment


def test_pipeline_env_configmap_matches_the_compiled_pipeline(rendered):
    """The ConfigMap every pipeline step reads (ENV_CONFIG_MAP), in the namespace the runs use."""
    assert pipeline_constant("ENV_CONFIG_MAP") == "e3-pruner-env"
    (default,) = pipeline_env(rendered["default"])
    # no kfp.namespace: the release namespace; AWS S3 (no endpoint), no hub mirror
    assert default["metadata"]["namespace"] == NAMESPACE
    assert default["data"] == {"AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_URI": TRACKING_URI}
    (sample,) = pipeline_env(rendered["sample"])
    assert sample["metadata"]["namespace"] == PIPELINE_NS == VALUE_SETS["sample"]["kfp"]["namespace"]
    assert sample["data"] == {
        "AWS_ENDPOINT_URL": "http://minio.minio.svc.cluster.local:9000",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": TRACKING_URI,
    }
    # only keys the pipeline reads
    config_keys = {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "HF_ENDPOINT"}
    assert set(sample["data"]) <= config_keys and all(f'"{k}"' in PIPELINE.read_text() for k in config_keys)


def test_pipeline_env_values(chart):
    values = {
        "pipelineEnv": {"namespace": "kubeflow", "hfEndpoint": "https://hf-mirror.example.com"},
        "kfp": {"namespace": "team-a"},  # pipelineEnv.namespace wins
        "s3": {"endpoint": "", "region": ""},
        "mlflow": {"enabled": False, "externalTrackingUri": "https://mlflow.example.com"},
    }
    (cm,) = pipeline_env(objects(render(chart, values)))
    assert cm["metadata"]["namespace"] == "kubeflow"
    assert cm["data"] == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com",
        "HF_ENDPOINT": "https://hf-mirror.example.com",
    }
    kubernetes_validate.validate(cm, KUBE_VERSION, strict=True)
    sample_off = copy.deepcopy(VALUE_SETS["sample"])
    sample_off["pipelineEnv"] = {"create": False}
    for off in ({"pipelineEnv": {"create": False}}, sample_off):
        docs = objects(render(chart, off))
        assert pipeline_env(docs) == [] and docs


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_notes_tell_how_to_create_the_pipeline_secret(chart, which):
    notes = next(t for p, t in render(chart, VALUE_SETS[which]).items() if p.endswith("NOTES.txt"))
    ns = PIPELINE_NS if which == "sample" else NAMESPACE
    secret = pipeline_constant("S3_SECRET")
    assert f"kubectl create secret generic {secret} -n {ns} --from-literal=AWS_ACCESS_KEY_ID=" in notes
    assert "IRSA" in notes and "ConfigMap e3-pruner-env (created by this release)" in notes
    readme = (CHART / "README.md").read_text()
    assert f"kubectl create secret generic {secret} -n <pipeline namespace>" in readme


# ---------------------------------------------------------------- schema


def with_(path: str, value) -> dict:
    """Values with one dotted key set (None removes the key, as in Helm)."""
    out: dict = {}
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


BAD_VALUES = {
    "missing-artifacts-destination": (with_("mlflow.artifactsDestination", None), "artifactsDestination"),
    "missing-kfp-host": (with_("kfp.host", None), "host"),
    "schedule-without-parameters": ({"schedules": [{"name": "a"}]}, "parameters"),
    "schedule-without-name": ({"schedules": [{"parameters": {}}]}, "name"),
    "workers-not-int": (with_("mlflow.workers", "four"), "workers"),
    "catchup-not-bool": (with_("scheduleDefaults.catchup", "no"), "catchup"),
    "parameters-not-object": ({"schedules": [{"name": "a", "parameters": "x=1"}]}, "parameters"),
    "cron-words": ({"schedules": [{"name": "a", "cron": "every night", "parameters": {}}]}, "cron"),
    "cron-7-fields": ({"schedules": [{"name": "a", "cron": "0 0 3 * * * 2030", "parameters": {}}]}, "cron"),
    "cron-4-fields": (with_("scheduleDefaults.cron", "0 3 * *"), "cron"),
    "cron-quartz-hash": (with_("scheduleDefaults.cron", "0 3 * * 1#2"), "cron"),
    "cron-reboot": (with_("scheduleDefaults.cron", "@reboot"), "cron"),
    "max-concurrency-above-kfp-bound": (with_("scheduleDefaults.max_concurrency", 11), "max_concurrency"),
    "schedule-name-not-dns": ({"schedules": [{"name": "Qwen_8B", "parameters": {}}]}, "name"),
    "dialect-enum": (with_("mlflow.database.dialect", "sqlite"), "dialect"),
    "artifacts-not-s3": (with_("mlflow.artifactsDestination", "/mnt/artifacts"), "artifactsDestination"),
    "root-allowed": (with_("job.podSecurityContext.runAsNonRoot", False), "runAsNonRoot"),
    "no-uri-key-and-no-host": (with_("mlflow.database.uriKey", ""), "uriKey"),
    "unknown-key": (with_("mlflow.replicaCount", 2), "replicaCount"),
    "pull-policy-enum": (with_("image.pullPolicy", "Sometimes"), "pullPolicy"),
    "pipeline-env-namespace-not-dns": (with_("pipelineEnv.namespace", "Team_A"), "namespace"),
    "hf-endpoint-not-url": (with_("pipelineEnv.hfEndpoint", "hf-mirror"), "hfEndpoint"),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_schema_rejects_bad_values(chart, name):
    values, where = BAD_VALUES[name]
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, values)
    assert "schema" in str(err.value) and where in str(err.value), str(err.value)


def test_lint_reports_schema_errors():
    report = helm.lint(CHART, BAD_VALUES["cron-words"][0], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] and any("cron" in m["error"] for m in report["messages"] if m["severity"] == 3), report


@pytest.mark.parametrize(
    "cron", ["0 3 * * *", "*/15 * * * *", "0 30 4 * * 0", "0 0 12 ? * MON-FRI", "0 3 1,15 * *", "@daily", "@every 6h"]
)
def test_schema_accepts_what_e3prune_schedule_accepts(chart, cron):
    docs = objects(render(chart, {"schedules": [{"name": "a", "cron": cron, "parameters": {}}]}))
    cm = schedule_configmap(docs)
    assert yaml.safe_load(cm["data"]["a.yaml"])["cron"] == cron


# ---------------------------------------------------------------- docs


def leaf_paths(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaf_paths(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    # a map documented as a whole (e.g. `mlflow.resources`) covers its leaves
    missing = [p for p in leaf_paths(values) if not any(p == d or p.startswith(d + ".") for d in documented)]
    assert missing == []
