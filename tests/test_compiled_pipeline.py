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
    """Every step of a compressing run by name: the loop of the teacher's fan-out is replaced by its task."""
    spec = _spec()
    tasks = {"detect-release": spec["root"]["dag"]["tasks"]["detect-release"]}
    for name, task in _branch(spec, "condition-1", "new-release", "compress").items():
        if "parameterIterator" in task:
            tasks.update(spec["components"][task["componentRef"]["name"]]["dag"]["tasks"])
        else:
            tasks[name] = task
    return tasks


def test_the_teacher_fans_out_over_detect_release_shard_ids_and_the_join_collects_the_parts():
    spec = _spec()
    compress = _branch(spec, "condition-1", "new-release", "compress")
    (loop_name,) = [n for n, t in compress.items() if "parameterIterator" in t]
    loop = compress[loop_name]
    assert loop["taskInfo"]["name"] == "teacher-shards"
    items = loop["parameterIterator"]["items"]["inputParameter"]
    assert items == "pipelinechannel--detect-release-teacher_shard_ids"
    assert loop["inputs"]["parameters"][items]["componentInputParameter"] == items
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"teacher-logits"}
    index = inner["teacher-logits"]["inputs"]["parameters"]["shard_index"]["componentInputParameter"]
    assert index == loop["parameterIterator"]["itemInput"]
    join = compress["join-teacher-cache"]
    parts = join["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]
    assert parts == {"outputArtifactKey": "pipelinechannel--teacher-logits-cache", "producerTask": loop_name}
    for step in ("search-mask", "distill"):  # every later step reads the joined cache
        cache = compress[step]["inputs"]["artifacts"]["teacher_cache"]["taskOutputArtifact"]
        assert cache == {"outputArtifactKey": "cache", "producerTask": "join-teacher-cache"}, step


def test_only_a_new_release_runs_the_compression_and_a_pending_gate_runs_alone():
    spec = _spec()
    # KFP numbers conditions and loops in one sequence: the teacher's loop (inside condition-1) is 2.
    assert set(spec["root"]["dag"]["tasks"]) == {"detect-release", "condition-1", "condition-3"}
    assert set(_tasks()) == STEPS
    (gate,) = _branch(spec, "condition-3", "pending-gate", "gate").values()
    assert gate["taskInfo"]["name"] == "promote" and not gate["cachingOptions"].get("enableCache")
    version = gate["inputs"]["parameters"]["version"]["componentInputParameter"]
    assert version == "pipelinechannel--detect-release-pending_gate_version"


def test_retries_caching_resources_and_credentials_per_step():
    from e3prune_pipelines.e3_pruner.cluster import ENV_CONFIG_MAP, NETWORK_RETRIES, S3_SECRET

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


def _gpu_docs(path=None) -> list[dict]:
    path = path or _spec_path().with_name("pipeline-gpu.yaml")
    return list(yaml.safe_load_all(Path(path).read_text()))


def test_the_gpu_pipeline_asks_for_gpus_on_the_heavy_steps_only():
    from e3prune_components.image import DEFAULT_CUDA_IMAGE
    from e3prune_pipelines.e3_pruner.cluster import GPU_STEPS

    spec, platform = _gpu_docs()
    assert spec["pipelineInfo"]["name"] == "e3-pruner-gpu"
    assert spec["root"]["inputDefinitions"] == _spec()["root"]["inputDefinitions"]  # the same run form
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, ex in spec["deploymentSpec"]["executors"].items():
        task = name.removeprefix("exec-")
        assert ex["container"]["image"] == DEFAULT_CUDA_IMAGE, name
        accelerator = ex["container"].get("resources", {}).get("accelerator")
        if task in GPU_STEPS:
            assert accelerator == {"count": "1", "resourceCount": "1", "resourceType": "nvidia.com/gpu",
                                   "type": "nvidia.com/gpu"}, name  # fmt: skip
            assert k8s[name]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}, name
            assert k8s[name]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert k8s[name]["emptyDirMounts"] == [
                {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
            ]
        else:
            assert accelerator is None and "nodeSelector" not in k8s[name], name


def test_compile_writes_a_gpu_pipeline_with_other_counts_labels_and_taints(tmp_path):
    from e3prune_pipelines.compile import main

    out = tmp_path / "mine.yaml"
    args = ["--gpu-output", str(out), "--gpus", "2", "--distill-gpus", "8", "--shm-size", "64Gi",
            "--node-selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3", "--toleration", "dedicated=ml:NoExecute"]  # fmt: skip
    assert main(args) == 0
    spec, platform = _gpu_docs(out)
    counts = {n: ex["container"]["resources"]["accelerator"]["count"]
              for n, ex in spec["deploymentSpec"]["executors"].items() if "accelerator" in ex["container"].get("resources", {})}  # fmt: skip
    assert counts == {"exec-teacher-logits": "2", "exec-search-mask": "2", "exec-harden-mask": "2",
                      "exec-evaluate": "2", "exec-distill": "8"}  # fmt: skip
    distill = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]
    assert distill["nodeSelector"] == {"labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    assert distill["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]
    assert distill["emptyDirMounts"][0]["sizeLimit"] == "64Gi"


def test_bad_gpu_compile_settings_are_one_error(tmp_path):
    import subprocess
    import sys

    for args, field in ((["--gpus", "0"], "gpus"), (["--toleration", "k:Sometimes"], "toleration"),
                        (["--node-selector", "nolabel"], "node_selector")):  # fmt: skip
        out = tmp_path / "x.yaml"
        run = subprocess.run([sys.executable, "-m", "e3prune.cli", "compile", "--gpu-output", str(out), *args],
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 2 and run.stderr.startswith(f"error: {field}: "), run.stderr
        assert not out.exists()


def test_submit_and_schedule_take_the_gpu_build_by_name(monkeypatch):
    from e3prune_pipelines.submit import SubmitConfig

    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", "http://127.0.0.1:1")
    cfg = SubmitConfig.parse(package="gpu", pipeline_name="e3-pruner-gpu", parameters={"remove_ratio": 0.4})
    assert cfg.package_path().name == "pipeline-gpu.yaml" and cfg.parameters == {"remove_ratio": 0.4}
    assert SubmitConfig.parse().package_path().name == "pipeline.yaml"
