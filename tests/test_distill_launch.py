"""The distill launcher (``e3prune.launch``): one process against two launched gloo processes on the
tiny Qwen3 of tests/test_distill.py, a launched run killed outright and resumed, and the settings it
refuses before any process starts or weight loads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from accelerate.commands.launch import launch_command_parser
from safetensors.torch import load_file
from test_distill import SEQ, SPLIT_SEQUENCES, tiny_cache, tiny_student, tiny_teacher  # noqa: F401

from e3prune.distill import DistillConfig
from e3prune.distill_inputs import checkpoint_store
from e3prune.errors import E3PruneError
from e3prune.launch import FSDP_SETTINGS, LaunchPlan, accelerate_command, launch_distill, plan_launch
from e3prune.run_config import RunConfig

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
# entropy_kd: the loss whose token weights are normalised over the global batch (an all-reduce),
# the reduction that has to be right for 2 processes to train like 1.
TRAIN = dict(loss="entropy_kd", distill_tokens=STEPS * 4 * SEQ, allow_repeat=True, learning_rate=3e-3,
             checkpoint_every_steps=2, batch_size=2)  # fmt: skip


def _cfg(student, cache, out, **kw) -> DistillConfig:
    return DistillConfig(**{"student": str(student), "teacher_cache": str(cache), "output": str(out), **kw})


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cli(out: Path, student, cache) -> list[str]:
    """``e3prune distill --processes 2`` with :data:`TRAIN`'s settings."""
    flags = {**TRAIN, "student": student, "teacher_cache": cache, "output": out, "processes": 2}
    args = [sys.executable, "-m", "e3prune.cli", "distill"]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}"] if value is True else [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def two_processes(tiny_student, tiny_cache, tmp_path_factory):  # noqa: F811
    """An uninterrupted run of 2 launched gloo processes × batch 2: (output, summary, streamed lines, seconds)."""
    out = tmp_path_factory.mktemp("two") / "out"
    lines: list[str] = []
    started = time.time()
    summary = launch_distill(_cfg(tiny_student, tiny_cache, out, processes=2, **TRAIN), log=lines.append)
    return out, summary, lines, time.time() - started


@pytest.mark.slow
def test_two_launched_processes_train_like_one(tiny_student, tiny_cache, two_processes, tmp_path):  # noqa: F811
    """1 process × batch 2 × 2 accumulation steps against 2 processes × batch 2: the same global
    batch of 4 sequences a step. Per-step losses (and their parts) within 1e-5; final weights within
    1e-3 (AdamW moves a near-zero gradient component by about the learning rate whichever sign
    rounding gives it; see tests/test_distill.py)."""
    two, summary, lines, _ = two_processes
    assert summary["num_processes"] == 2 and summary["steps"] == STEPS and summary["global_batch_sequences"] == 4
    assert "2 gloo processes on CPU" in lines[0]  # the launcher's line, then the processes' own log
    assert any(f"step {STEPS}/{STEPS} loss" in line for line in lines), lines[-20:]

    one = launch_distill(_cfg(tiny_student, tiny_cache, tmp_path / "one", **{**TRAIN, "processes": 1},
                              grad_accumulation_steps=2))  # fmt: skip
    assert one["num_processes"] == 1 and one["global_batch_sequences"] == 4
    got, want = _rows(tmp_path / "one"), _rows(two)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for key in ("loss", "kl", "ce", "entropy"):
        assert max(abs(a[key] - b[key]) for a, b in zip(got, want)) < 1e-5, key
    assert want[-1]["loss"] < 0.9 * want[0]["loss"]  # it trained
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-3


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.slow
def test_killed_launch_resumes_from_its_checkpoint(tiny_student, tiny_cache, two_processes, tmp_path):  # noqa: F811
    """``e3prune distill --processes 2``, every process of it killed with SIGKILL (as when a pod is
    deleted) after the first checkpoint; the same command again resumes from that checkpoint and
    ends with the per-step losses of the uninterrupted 2-process run within 1e-5."""
    out, ckpt = tmp_path / "killed", tmp_path / "killed.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(_cli(out, tiny_student, tiny_cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    seen: set[psutil.Process] = set()
    while not list(ckpt.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        seen.update(_tree(proc.pid))
        time.sleep(0.02)
    tree = _tree(proc.pid)
    assert len(tree) >= 4, tree  # the launcher, accelerate's torchrun agent, 2 workers
    for p in tree:
        p.kill()
    proc.wait()
    psutil.wait_procs(seen | set(tree), timeout=10)
    assert not [p for p in seen | set(tree) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    stopped_at = max(json.loads(p.read_text())["step"] for p in ckpt.glob("step-*/progress.json"))
    assert 0 < stopped_at < STEPS and not out.exists()

    done = subprocess.run(_cli(out, tiny_student, tiny_cache), capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"resumed from step {stopped_at}" in done.stdout
    summary = json.loads((out / "distillation.json").read_text())
    assert summary["resumed_from_step"] == stopped_at and summary["num_processes"] == 2
    got, straight = _rows(out), _rows(two_processes[0])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, straight)) < 1e-5
    assert not ckpt.exists()


def test_bad_launch_settings_fail_before_anything_starts(tiny_student, tiny_cache, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    monkeypatch.setattr("e3prune.threads.cpu_quota", lambda: 2)  # a pod with 2 CPUs, whatever runs the test
    started = []
    monkeypatch.setattr("e3prune.launch.run_streaming", lambda *a: started.append(a))

    def fails(field: str, words: str, **kw) -> None:
        with pytest.raises(E3PruneError) as err:
            launch_distill(_cfg(tiny_student, tiny_cache, out, **{**TRAIN, **kw}))
        assert err.value.field == field and words in str(err.value), err.value
        assert not started and not out.exists() and not (tmp_path / "out.ckpt").exists()

    if not torch.cuda.is_available():
        # More gloo processes than the pod has CPUs.
        fails("distill_processes", "3 gloo processes on a pod with 2 CPUs", processes=3)
        # bf16 on a CPU-only pod, before two processes would each fail on it.
        fails("mixed_precision", "bf16", processes=2, mixed_precision="bf16")
        # 2 processes × 16 sequences a step, the split has 16 (one process of 16 would fit).
        fails("distill_processes", f"32 sequences a step, but the teacher cache's distill split has {SPLIT_SEQUENCES}",
              processes=2, batch_size=16)  # fmt: skip
    # More GPUs than the pod sees (a pod with 2 GPUs; 0 means all of them).
    cfg = _cfg(tiny_student, tiny_cache, out, processes=3)
    with pytest.raises(E3PruneError) as err:
        plan_launch(cfg, gpus=2, cpus=16)
    assert err.value.field == "distill_processes" and "this pod sees 2" in str(err.value)
    all_gpus = cfg.model_copy(update={"processes": 0})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert plan_launch(all_gpus, gpus=4, cpus=16) == LaunchPlan(4, 1, 4, 4)  # the pod's CPUs shared out
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert plan_launch(all_gpus, gpus=4, cpus=16).threads == 3  # the user's setting wins
    assert plan_launch(cfg.model_copy(update={"processes": 0}), gpus=0, cpus=16).processes == 1

    # The launch settings are not part of what a checkpoint belongs to (it checks the process count it
    # was written by itself): distill_processes 0 on 2 GPUs and 2 resume each other's checkpoints.
    assert checkpoint_store(all_gpus).key == checkpoint_store(cfg.model_copy(update={"processes": 2})).key

    # Out of range, as the pipeline's first step reports it (by the pipeline parameter's name).
    for param, value in (("distill_processes", -1), ("distill_nodes", 0)):
        with pytest.raises(E3PruneError) as err:
            RunConfig.parse({param: value}).check()
        assert err.value.field == param, err.value


def test_several_nodes_go_to_a_trainjob_when_a_trainer_is_there(tiny_student, tiny_cache, tmp_path, monkeypatch):  # noqa: F811
    """nodes > 1: the Trainer is checked, then the run goes to ``e3prune.trainjob`` with the step's image."""
    from e3prune import trainjob  # the cluster side is tests/test_trainjob.py's; here only the hand-over

    calls = []

    def no_trainer():
        calls.append("check")
        raise E3PruneError("no Kubeflow Trainer in this cluster", field="distill_nodes")

    monkeypatch.setattr(trainjob, "check_trainer_available", no_trainer)
    monkeypatch.setattr(
        trainjob,
        "run_distill_trainjob",
        lambda cfg, *, image, log: calls.append(("run", cfg.nodes, image)) or {"steps": 3},
    )
    monkeypatch.delenv("E3PRUNE_IMAGE", raising=False)
    cfg = _cfg(tiny_student, tiny_cache, tmp_path / "out", nodes=2)

    with pytest.raises(E3PruneError) as err:  # no image to run the training pods in
        launch_distill(cfg)
    assert err.value.field == "distill_nodes" and "image" in str(err.value) and calls == []
    with pytest.raises(E3PruneError) as err:  # 2 nodes × 16 sequences a step, the split has 16
        launch_distill(cfg.model_copy(update={"batch_size": 16}), image="registry/e3:1")
    assert err.value.field == "distill_nodes" and "32 sequences a step" in str(err.value) and calls == []
    with pytest.raises(E3PruneError) as err:
        launch_distill(cfg, image="registry/e3:1")
    assert err.value.field == "distill_nodes" and calls == ["check"]

    monkeypatch.setattr(trainjob, "check_trainer_available", lambda: calls.append("available"))
    assert launch_distill(cfg, image="registry/e3:1") == {"steps": 3}
    assert calls == ["check", "available", ("run", 2, "registry/e3:1")]
    assert not (tmp_path / "out").exists()


def test_gpu_launch_is_fsdp_as_in_the_shipped_accelerate_config(tmp_path):
    """The flags the launcher gives ``accelerate launch`` on GPUs parse with the installed accelerate
    and say what configs/accelerate/fsdp_gpu.yaml says (the file ships in the image, the flags in the package)."""
    shipped = yaml.safe_load((REPO / "configs/accelerate/fsdp_gpu.yaml").read_text())
    assert shipped["distributed_type"] == "FSDP" and shipped["mixed_precision"] == "bf16"
    as_flags = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in shipped["fsdp_config"].items()}
    assert as_flags == FSDP_SETTINGS

    gpu = accelerate_command(LaunchPlan(8, 1, 8, 2), tmp_path / "c.json", 29500, "bf16")
    args = launch_command_parser().parse_args(gpu[3:])
    assert args.use_fsdp and not args.multi_gpu and args.num_processes == 8 and args.mixed_precision == "bf16"
    assert (args.fsdp_version, args.fsdp_state_dict_type) == ("2", "SHARDED_STATE_DICT")
    assert args.training_script == "e3prune.distill" and args.module
    assert args.training_script_args == ["--config", str(tmp_path / "c.json"), "--verbose"]
    cpu = launch_command_parser().parse_args(
        accelerate_command(LaunchPlan(2, 1, 0, 1), tmp_path / "c.json", 1, "no")[3:]
    )
    assert cpu.multi_gpu and not cpu.use_fsdp and not cpu.cpu and cpu.num_cpu_threads_per_process == 1


def _stand_in_launch() -> tuple[subprocess.Popen, psutil.Process, psutil.Process]:
    """``run_streaming`` in a process of its own, running a stand-in for accelerate launch that starts a
    worker in a session of its own, as torchrun does: (the launcher, the launch, the worker)."""
    worker = "import time; time.sleep(600)"
    launch = (
        "import os, subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
        "print('launch', os.getpid(), 'worker', p.pid, flush=True); time.sleep(600)"
    )
    script = (
        "import os, sys; from e3prune.launch import run_streaming; "
        f"run_streaming([sys.executable, '-c', {launch!r}], dict(os.environ), print)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    words = proc.stdout.readline().split()
    assert words[0] == "launch", words
    launch_process, worker_process = psutil.Process(int(words[1])), psutil.Process(int(words[3]))
    assert worker_process.ppid() == launch_process.pid and launch_process.ppid() == proc.pid
    return proc, launch_process, worker_process


def _gone(process: psutil.Process) -> bool:
    _, alive = psutil.wait_procs([process], timeout=10)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]  # a zombie if nobody reaps it


def test_sigterm_reaches_every_process_of_the_launch():
    """SIGTERM to the launching process (Kubernetes stopping the pod, ``e3prune run`` stopping a step)
    reaches a process the launch started in a session of its own, as torchrun starts its workers;
    the launcher then exits with 128 + SIGTERM. A stand-in launch: no training needed to show it.
    A launcher killed outright (SIGKILL, no handler runs) still takes the launch with it: the kernel
    sends it SIGTERM (accelerate's torchrun then stops its own workers)."""
    proc, launch_process, worker_process = _stand_in_launch()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert _gone(launch_process) and _gone(worker_process)

    proc, launch_process, worker_process = _stand_in_launch()
    proc.kill()
    proc.wait()
    assert _gone(launch_process)
    worker_process.kill()  # the stand-in forwards nothing to its worker; torchrun does


@pytest.mark.slow
def test_a_failing_launch_is_one_error_with_the_end_of_its_output(tiny_student, tmp_path, tiny_cache):  # noqa: F811
    """A student whose weights cannot be read passes every check made before weights load; the two
    processes then fail, and the step's error has their exit code and the processes' own message."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny_student).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    lines: list[str] = []
    with pytest.raises(E3PruneError) as err:
        launch_distill(_cfg(broken, tiny_cache, tmp_path / "out", processes=2, **TRAIN), log=lines.append)
    message = str(err.value)
    assert err.value.field == "student", message  # the processes' own error leads, with its field
    assert message.startswith("student: the 2 distillation processes failed with exit code 1: student: "), message
    assert message.splitlines()[-1] == lines[-1] and "ChildFailedError" in message  # then torchrun's report
    assert not (tmp_path / "out").exists()
