"""The committed pipeline and component YAML: fresh, air-gap safe, documented, wired as designed."""

from __future__ import annotations

from pathlib import Path

import yaml

from e3prune_pipelines.e3_pruner.pipeline import STEPS as PIPELINE_STEPS


def _spec_path():
    import e3prune_pipelines

    return Path(e3prune_pipelines.__file__).parent / "e3_pruner" / "pipeline.yaml"


def _spec():
    return next(yaml.safe_load_all(_spec_path().read_text()))


def test_committed_yaml_matches_a_fresh_compile(monkeypatch):
    monkeypatch.delenv("E3PRUNE_IMAGE", raising=False)
    from e3prune_pipelines.compile import check

    problems = check()
    assert not problems, "\n".join(problems)


def test_components_install_nothing_at_run_time_and_use_the_one_image():
    from e3prune_components.image import DEFAULT_IMAGE

    executors = _spec()["deploymentSpec"]["executors"]
    assert len(executors) == len(STEPS) + 1  # promote twice: after register, and the gate-only branch
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == DEFAULT_IMAGE, name
        text = " ".join(container["command"])
        assert "pip install" not in text and "pip_install" not in text, name


def test_every_parameter_has_a_default_and_a_description():
    from e3prune.run_config import RunConfig

    params = _spec()["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(RunConfig.model_fields)
    for name, p in params.items():
        assert p.get("description"), f"{name} has no description"
        assert "defaultValue" in p or p.get("isOptional"), f"{name} has no default"
        assert p["defaultValue"] == RunConfig.model_fields[name].default, name


STEPS = set(PIPELINE_STEPS)


def _branch(spec: dict, name: str, display: str, action: str) -> dict:
    task = spec["root"]["dag"]["tasks"][name]
    assert task["taskInfo"]["name"] == display
    condition = task["triggerPolicy"]["condition"]
    assert "detect-release-Output" in condition and condition.endswith(f"== '{action}'"), condition
    return spec["components"][f"comp-{name}"]["dag"]["tasks"]


def _tasks() -> dict:
    spec = _spec()
    tasks = {"detect-release": spec["root"]["dag"]["tasks"]["detect-release"]}
    tasks.update(_branch(spec, "condition-1", "new-release", "compress"))
    return tasks


def test_only_a_new_release_runs_the_compression_and_a_pending_gate_runs_alone():
    spec = _spec()
    assert set(spec["root"]["dag"]["tasks"]) == {"detect-release", "condition-1", "condition-2"}
    assert set(_tasks()) == STEPS
    (gate,) = _branch(spec, "condition-2", "pending-gate", "gate").values()
    assert gate["taskInfo"]["name"] == "promote" and not gate["cachingOptions"].get("enableCache")
    version = gate["inputs"]["parameters"]["version"]["componentInputParameter"]
    assert version == "pipelinechannel--detect-release-pending_gate_version"


def test_retries_caching_resources_and_credentials_per_step():
    from e3prune_pipelines.e3_pruner.pipeline import ENV_CONFIG_MAP, NETWORK_RETRIES, S3_SECRET

    tasks = _tasks()
    for name, task in tasks.items():
        assert ("retryPolicy" in task) == (name in NETWORK_RETRIES), name
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (name not in ("detect-release", "export", "register", "promote")), name
    executors = _spec()["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        res = ex["container"].get("resources", {})
        assert res.get("resourceCpuRequest") or res.get("cpuRequest"), name
        assert res.get("resourceMemoryRequest") or res.get("memoryRequest"), name
    docs = list(yaml.safe_load_all(_spec_path().read_text()))
    assert len(docs) == 2, "the kubernetes platform spec (secrets, config maps) is missing"
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(k8s) == len(STEPS) + 1
    for name, ex in k8s.items():
        assert ex["secretAsEnv"][0]["secretName"] == S3_SECRET and ex["secretAsEnv"][0]["optional"], name
        assert ex["configMapAsEnv"][0]["configMapName"] == ENV_CONFIG_MAP, name


def test_each_component_has_its_readme_yaml_and_tests():
    import e3prune_components
    from e3prune_pipelines.compile import COMPONENTS

    root = Path(e3prune_components.__file__).parent
    for name in COMPONENTS:
        d = root / name
        assert (d / "component.py").is_file() and (d / "component.yaml").is_file(), name
        readme = (d / "README.md").read_text()
        assert f"# {name}" in readme and "## Inputs" in readme and "## Outputs" in readme, name


def test_the_library_never_imports_kfp():
    """docs/architecture.md: dependencies point down; only the pipeline layer (and the CLI commands that
    reach it, when called) import kfp."""
    import subprocess
    import sys

    import e3prune

    modules = sorted(p.stem for p in Path(e3prune.__file__).parent.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('e3prune.' + m)\n"
        "import e3prune.cli; e3prune.cli.build_parser()\n"
        "print(sorted(n for n in sys.modules if n == 'kfp' or n.startswith('kfp.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
