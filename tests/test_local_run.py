"""``e3prune run`` against real kills, real signals and a second real run on the same directory.

A run killed during the search, run again: the search continues from its last state. Real processes: ``e3prune run`` (kfp.local, every step a subprocess) is SIGKILLed, with its
process group, once the search has saved its resumable state; a second ``e3prune run`` with the
same parameters reuses the complete outputs of sample-data and teacher-logits (the work
locations are keyed by each step's inputs), resumes the search from the saved state, and ends
with the keep-set and θ of an uninterrupted search on the same cache. A second run started on a
directory in use is refused, naming the first; SIGTERM to ``e3prune run`` stops its running step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARAMS = {
    "seq_len": 64,
    "search_split_tokens": 8192,
    "distill_split_tokens": 4096,
    "eval_split_tokens": 2048,
    "search_budget_tokens": 64 * 8 * 150,  # 150 steps of 8 × 64; state saved every 25
    "distill_budget_tokens": 2048,
    "selection_method": "e3",  # the search's own state is what is killed and resumed here
}


def _command(output: Path) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in PARAMS.items()]
    return [sys.executable, "-m", "e3prune.cli", "run", "--output", str(output), *flags]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_saved_state(output: Path, proc: subprocess.Popen, timeout: float = 420) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [p for p in output.glob("storage/work/search_mask/*.state") if p.is_dir() and any(p.rglob("*.json"))]
        if states:
            return states[0]
        assert proc.poll() is None, "the run ended before the search saved any state"
        time.sleep(0.5)
    raise AssertionError("the search saved no state in time")


@pytest.mark.slow
def test_a_killed_search_resumes_in_the_next_run_and_gives_the_same_keep_set(tmp_path):
    from e3prune.reference import default_model
    from e3prune.run_config import RunConfig
    from e3prune.search import SearchConfig, search_mask

    output = tmp_path / "run"
    first = subprocess.Popen(
        _command(output), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        state = _wait_for_saved_state(output, first)
        time.sleep(1.0)  # let it run on past the save, so the kill lands mid-step
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (search_out,) = [p for p in output.glob("storage/work/search_mask/*") if not p.name.endswith(".state")] or [None]
    assert search_out is None, "the search finished before it was killed; raise search_budget_tokens"

    second = subprocess.run(_command(output), env=_env(), capture_output=True, text=True, timeout=900)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert log.count("reusing the complete output of an earlier run") >= 2  # sample-data and teacher-logits
    assert "resum" in log.lower()

    (search_dir,) = [p for p in output.glob("storage/work/search_mask/*") if not p.name.endswith(".state")]
    assert state.parent == search_dir.parent
    resumed = json.loads((search_dir / "search.json").read_text())
    (cache,) = output.glob("storage/work/teacher_logits/*")
    params = RunConfig.parse(PARAMS).search_params()
    alone = search_mask(
        SearchConfig.parse(
            {**params, "model": str(default_model()), "teacher_cache": str(cache), "output": str(tmp_path / "alone")}
        )
    )
    assert resumed["keep"] == alone["keep"]
    assert resumed["theta"] == alone["theta"]
    _a_lost_gate_runs_in_the_next_run(output)


def _a_lost_gate_runs_in_the_next_run(output: Path) -> None:
    """A version registered by a run whose promote never finished: the next run runs the gate alone."""
    from mlflow import MlflowClient

    from e3prune import gate, registry

    client = MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='e3-pruner-reference'")
    for key in [k for k in version.tags if k.startswith("e3prune.gate.")]:
        client.delete_model_version_tag(version.name, version.version, key)  # as if promote was killed
    client.delete_registered_model_alias(version.name, registry.CHAMPION)
    third = subprocess.run(_command(output), env=_env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
    assert f"gate only: registered as version {version.version} but its gate never ran" in third.stdout
    again = client.get_model_version(version.name, version.version)
    decision = gate.gate_decision(again)
    if decision == "rejected":  # only the speed measurement of the first run, on a busy 2-core CI machine, may fail
        assert gate.version_metrics(again).get(gate.SPEED_RELIABLE_METRIC) == 0.0, third.stdout[-3000:]
        assert "rejected" in third.stdout
    else:
        assert decision == "promoted" and "promoted to champion" in third.stdout
    assert len(client.search_model_versions("name='e3-pruner-reference'")) == 1  # nothing compressed again


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused_and_sigterm_stops_the_steps(tmp_path):
    import psutil

    output = tmp_path / "run"
    first = subprocess.Popen(_command(output), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not psutil.Process(first.pid).children(recursive=True):  # a step is running
            assert first.poll() is None and time.time() < deadline, "no step started"
            time.sleep(0.2)
        second = subprocess.run(_command(output), env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"error: output: {output} is in use by another e3prune run (pid {first.pid}" in second.stderr
        steps = psutil.Process(first.pid).children(recursive=True)
        first.send_signal(signal.SIGTERM)  # to e3prune run alone, not to its process group
        assert first.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(steps, timeout=30)
        assert not alive, f"steps left running after SIGTERM: {alive}"
    finally:
        if first.poll() is None:
            os.killpg(os.getpgid(first.pid), signal.SIGKILL)
