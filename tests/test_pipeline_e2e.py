"""The whole pipeline, end to end, on real servers.

A real SeaweedFS (S3) and a real ``mlflow server`` (sqlite backend, artifacts proxied to that
S3) are started by the fixtures; the compiled pipeline runs through ``kfp.local``'s subprocess
runner on the shipped reference model at small budgets. Then: the exported model is in S3,
complete, and loads and generates; MLflow holds the run, its curves and metrics, and a version
with alias ``challenger``; every step wrote its outputs. The failure behaviour of the register
step (MLflow down, then re-running only that step) is checked on the outputs of the same run.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from e3prune_pipelines.e3_pruner.pipeline import STEPS

SMALL = {
    "search_split_tokens": 8192,
    "distill_split_tokens": 8192,
    "eval_split_tokens": 8192,
    "search_budget_tokens": 16384,
    "distill_budget_tokens": 8192,
    "seq_len": 128,
    "lm_eval_tasks": "python_stdlib_cloze",
    "lm_eval_limit": 16,
    "selection_method": "best",  # E³ and SLEB, scored on held-back data (the e3 path: tests/test_local_run.py)
}


def task_dirs(run_dir: Path) -> dict[str, list[Path]]:
    """Each task of a local run and its directories: one, or one per iteration of a ParallelFor
    (kfp.local writes ``for-loop-N-iteration-i/<task>/``: the teacher's fan-out)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(run_dir.iterdir()):
        inner = sorted(p for p in path.iterdir() if p.is_dir()) if "-iteration-" in path.name else [path]
        for d in inner:
            found.setdefault(d.name, []).append(d)
    return found


def task_artifacts(run_dir: Path, task: str) -> dict:
    """The output artifacts of one task of a local run (its first iteration in a loop), as KFP's executor wrote them."""
    from kfp import dsl

    out = json.loads((task_dirs(run_dir)[task][0] / "executor_output.json").read_text())
    classes = {
        "system.Model": dsl.Model,
        "system.Dataset": dsl.Dataset,
        "system.Markdown": dsl.Markdown,
        "system.Metrics": dsl.Metrics,
        "system.HTML": dsl.HTML,
    }
    result = {}
    for name, entry in out.get("artifacts", {}).items():
        (art,) = entry["artifacts"]
        cls = classes.get((art.get("type") or {}).get("schemaTitle"), dsl.Artifact)
        result[name] = cls(name=name, uri=art["uri"], metadata=art.get("metadata", {}))
    return result


@pytest.fixture(scope="module")
def pipeline_run(s3_server, mlflow_server, tmp_path_factory):
    """One run of the pipeline for the whole module (it is the expensive part)."""
    import os

    from s3_server import ACCESS_KEY, REGION, SECRET_KEY

    from e3prune_pipelines.local_run import run_local

    tmp = tmp_path_factory.mktemp("e2e")
    env = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp / "absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "absent"),
        "E3PRUNE_CACHE": str(tmp / "cache"),
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the steps are subprocesses: they get the environment a pod would have
    name = f"e3prune-e2e-{uuid.uuid4().hex[:8]}"
    prefix = f"s3://{s3_server.bucket}/e2e-{uuid.uuid4().hex[:8]}"
    try:
        params = {**SMALL, "storage_prefix": prefix, "registered_model_name": name}
        result = run_local(params, tmp / "run")
        yield {
            "result": result,
            "run_dir": Path(result["run_dir"]),
            "prefix": prefix,
            "name": name,
            "tmp": tmp,
            "params": params,
        }
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_every_step_ran_and_wrote_its_outputs(pipeline_run):
    from e3prune import storage

    run_dir = pipeline_run["run_dir"]
    assert sorted(task_dirs(run_dir)) == sorted(STEPS)
    for task in STEPS:
        arts = task_artifacts(run_dir, task)
        assert arts, f"{task} wrote no artifacts"
        for name, art in arts.items():
            pointer = art.metadata.get("uri")
            if name == "metrics":  # Metrics: the scalars travel in the metadata, as in the Kubeflow UI
                assert art.metadata, (task, name)
            elif pointer:  # large outputs live under the storage prefix, complete (marker verified on read)
                assert pointer.startswith(pipeline_run["prefix"] + "/"), (task, name, pointer)
                assert any(storage.input_dir(pointer, field=name).iterdir())
            else:
                assert Path(art.path).exists(), (task, name)
    search = task_artifacts(run_dir, "search-mask")
    assert len(search["search"].metadata["removed"]) == 6  # 25 % of 24 layers
    found = json.loads((storage.input_dir(search["search"].metadata["uri"]) / "search.json").read_text())
    scored = {c["source"]: c["held_back_kl"] for c in found["candidates"]}
    assert set(scored) == {"e3", "sleb"} and found["chosen_from"].endswith(min(scored, key=scored.get))
    assert "data:image/png;base64," in Path(search["plot"].path).read_text()
    report = Path(task_artifacts(run_dir, "evaluate")["report"].path).read_text()
    assert "perplexity" in report.lower()


@pytest.mark.slow
def test_exported_model_is_complete_in_s3_and_generates(pipeline_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from e3prune import storage

    exported = task_artifacts(pipeline_run["run_dir"], "export")["exported"].metadata["uri"]
    assert exported.startswith(f"{pipeline_run['prefix']}/models/{pipeline_run['name']}/")
    local = storage.input_dir(exported, field="exported")  # checks every file against _COMPLETE.json
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pruning.json", "metrics.json", "README.md"):
        assert (local / name).is_file(), name
    pruning = json.loads((local / "pruning.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    assert model.config.num_hidden_layers == 18 == pruning["num_hidden_layers"]
    tok = AutoTokenizer.from_pretrained(local)
    ids = tok("import os\ndef main(", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).strip()


@pytest.mark.slow
def test_mlflow_holds_run_metrics_and_challenger(pipeline_run, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    name = pipeline_run["name"]
    version = client.get_model_version_by_alias(name, "challenger")
    exported = task_artifacts(pipeline_run["run_dir"], "export")["exported"].metadata["uri"]
    assert version.tags["e3prune.source"] == "builtin:reference"
    assert len(version.tags["e3prune.kept_layers"].split(",")) == 18
    assert exported in (version.source, version.tags.get("e3prune.model_uri"))
    run = client.get_run(version.run_id)
    assert run.data.params["remove_ratio"] == "0.25"
    for key in ("teacher.perplexity", "pruned.perplexity", "student.perplexity", "speedup.prefill"):
        assert key in run.data.metrics, key
    assert run.data.metrics["student.layers"] == 18
    assert any(k.startswith("lm_eval.python_stdlib_cloze.student") for k in run.data.metrics)
    search_curve = client.get_metric_history(run.info.run_id, "search/loss")
    assert len(search_curve) >= 2 and sorted(m.step for m in search_curve) == [m.step for m in search_curve]
    assert client.get_metric_history(run.info.run_id, "distill/loss")
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "evaluation", "pruning.json"} <= listed
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/search.png" in plots
    summary = pipeline_run["result"]["summary"]
    assert "Layers kept:** 18 of 24" in summary and f"version {version.version}" in summary
    # The first version of a model has no champion to beat: the gate decides on the thresholds alone.
    assert version.tags["e3prune.gate.decision"] in ("promoted", "rejected")
    assert ("champion" in client.get_model_version(name, version.version).aliases) == (
        version.tags["e3prune.gate.decision"] == "promoted"
    )


@pytest.mark.slow
def test_the_next_scheduled_run_of_the_same_release_is_a_no_op(pipeline_run, mlflow_server):
    """Run the same pipeline again, as a schedule would: detect-release skips everything else."""
    from mlflow import MlflowClient

    from e3prune_pipelines.local_run import run_local

    again = run_local(pipeline_run["params"], pipeline_run["tmp"] / "run")
    run_dir = Path(again["run_dir"])
    assert [p.name for p in run_dir.iterdir()] == ["detect-release"]
    assert "skip: nothing new" in again["summary"]
    versions = MlflowClient(tracking_uri=mlflow_server.uri).search_model_versions(f"name='{pipeline_run['name']}'")
    assert len(versions) == 1


@pytest.mark.slow
def test_register_fails_clearly_when_mlflow_is_down_and_reruns_alone(pipeline_run, mlflow_server):
    """MLflow unreachable at register: clear error, the export stays in S3, re-running only register works."""
    from mlflow import MlflowClient

    from e3prune import storage
    from e3prune.errors import E3PruneError
    from e3prune_components.register.component import register

    run_dir = pipeline_run["run_dir"]
    inputs = {
        "run_config": task_artifacts(run_dir, "detect-release")["run_config"],
        "search": task_artifacts(run_dir, "search-mask")["search"],
        "distilled": task_artifacts(run_dir, "distill")["distilled"],
        "evaluation": task_artifacts(run_dir, "evaluate")["evaluation"],
        "exported": task_artifacts(run_dir, "export")["exported"],
    }
    first = MlflowClient(tracking_uri=mlflow_server.uri).get_model_version_by_alias(pipeline_run["name"], "challenger")
    registered_run = MlflowClient(tracking_uri=mlflow_server.uri).get_run(first.run_id)
    key = registered_run.data.tags["e3prune.run_key"]
    from kfp import dsl

    def summary():
        return dsl.Markdown(name="summary", uri=str(pipeline_run["tmp"] / f"summary-{uuid.uuid4().hex[:6]}.md"))

    mlflow_server.stop()
    try:
        with pytest.raises(E3PruneError) as err:
            register.python_func(**inputs, run_key=key, run_name="rerun", summary=summary(), mlflow_tracking_uri="")
        assert err.value.field == "mlflow_tracking_uri"
        assert "unreachable" in str(err.value)
        # The export is untouched and still complete.
        assert storage.input_dir(inputs["exported"].metadata["uri"], field="exported").is_dir()
    finally:
        mlflow_server.start()
    result = register.python_func(**inputs, run_key=key, run_name="rerun", summary=summary(), mlflow_tracking_uri="")
    assert result.version == first.version  # the same run key: no second version
    versions = MlflowClient(tracking_uri=mlflow_server.uri).search_model_versions(f"name='{pipeline_run['name']}'")
    assert len(versions) == 1


@pytest.mark.slow
def test_an_invalid_parameter_is_rejected_by_the_first_step(tmp_path, capfd, monkeypatch):
    """Straight through kfp.local (no CLI pre-check): detect-release fails, naming the parameter; nothing else runs."""
    from kfp import local

    from e3prune_pipelines.e3_pruner.pipeline import e3_pruner_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    with pytest.raises(RuntimeError, match="detect-release"):
        e3_pruner_pipeline(remove_ratio=1.5, storage_prefix=str(tmp_path / "storage"))
    assert "remove_ratio: must be in (0, 1), got 1.5" in capfd.readouterr().out
    with pytest.raises(RuntimeError, match="detect-release"):
        e3_pruner_pipeline(selection_method="greedy", storage_prefix=str(tmp_path / "storage"))
    assert "selection_method: Input should be 'e3', 'best', 'sleb', 'block_influence'" in capfd.readouterr().out
    for run_dir in (tmp_path / "kfp").iterdir():
        assert [p.name for p in run_dir.iterdir()] == ["detect-release"]
    assert not (tmp_path / "storage").exists()
