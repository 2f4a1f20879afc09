"""Launching the distill step over the pod's processes or over nodes (docs/operations.md,
"Distillation on several GPUs").

:func:`launch_distill` is what the distill component and ``e3prune distill`` call. From
``DistillConfig.processes`` / ``nodes`` (pipeline parameters ``distill_processes`` /
``distill_nodes``) and what the pod has, it

- with ``nodes`` > 1: hands the run to a Kubeflow Trainer TrainJob (``e3prune.trainjob``: the
  Trainer is checked first, then the job runs in the step's image and this returns its summary);
- with one process: calls :func:`e3prune.distill.distill` here, as the step always did;
- with N processes: runs ``python -m accelerate.commands.launch`` with explicit flags (N
  processes, one machine, a free port; on GPUs FSDP as in ``configs/accelerate/fsdp_gpu.yaml``,
  on a CPU-only pod N gloo workers), each running ``python -m e3prune.distill --config <json>``.
  The child's output is streamed into this step's log line by line; SIGTERM / SIGINT are
  forwarded to every process of the launch; a non-zero exit is one :class:`E3PruneError` with
  the exit code and the end of the output. The summary is read back from the output's
  ``distillation.json``.

Every check that can fail on the settings runs here, before a process starts or a weight loads:
more GPUs asked for than are visible, more CPU processes than the pod's CPUs (each gloo process
would time-share a core and hold a whole copy of the model: slower than fewer processes, never
faster), a global batch larger than the distill split, and the inputs as ``distill`` checks them.

The config goes to the processes as a JSON file, not as CLI flags: it is the validated model
itself (``model_dump``), so nothing is lost or re-parsed on the way, and the resume key the
processes compute from it is the one this process would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e3prune import storage
from e3prune.distill import SUMMARY_FILE, DistillConfig, distill, resolve_mixed_precision
from e3prune.errors import E3PruneError

log = logging.getLogger(__name__)

Log = Callable[[str], None]
TAIL_LINES = 40  # lines of a failed launch's output quoted in its error
STOP_GRACE_SECONDS = 30.0  # after a forwarded SIGTERM, what is still running is killed

# FSDP on the GPUs of one node, as flags of `accelerate launch`: the same settings as
# configs/accelerate/fsdp_gpu.yaml (tests/test_distill_launch.py keeps the two equal), built here
# because the YAML ships in the image (/opt/e3prune/configs) but not in the installed package.
FSDP_SETTINGS = {
    "fsdp_version": "2",
    "fsdp_reshard_after_forward": "true",
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_cpu_ram_efficient_loading": "true",
    "fsdp_offload_params": "false",
    "fsdp_activation_checkpointing": "false",
}


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes run where: ``processes`` on each of ``nodes``, on GPUs when ``gpus`` > 0."""

    processes: int  # per node
    nodes: int
    gpus: int  # GPUs visible to this pod (0: CPU, gloo)
    threads: int  # torch threads of each process: the pod's CPUs shared out, or the user's OMP_NUM_THREADS

    @property
    def world(self) -> int:
        return self.processes * self.nodes


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_launch(cfg: DistillConfig, gpus: int | None = None, cpus: int | None = None) -> LaunchPlan:
    """The processes ``cfg`` asks for on this pod; ``gpus`` / ``cpus`` default to what it has.

    Raises :class:`E3PruneError` naming ``distill_processes`` when they are not there. With
    ``nodes`` > 1 the processes run on the TrainJob's nodes, not here: only the count is kept.
    """
    from e3prune.threads import cpu_quota, user_threads

    gpus = visible_gpus() if gpus is None else gpus
    cpus = cpu_quota() if cpus is None else cpus
    if cfg.nodes > 1:
        return LaunchPlan(cfg.processes, cfg.nodes, gpus, 1)
    if gpus:
        n = cfg.processes or gpus
        if n > gpus:
            raise E3PruneError(
                f"{n} processes need {n} GPUs, this pod sees {gpus} (CUDA_VISIBLE_DEVICES / the pod's "
                f"nvidia.com/gpu limit); give at most {gpus}, 0 for all of them, or compile the pipeline "
                f"with --distill-gpus {n}",
                field="distill_processes",
            )
    else:
        n = cfg.processes or 1
        if n > cpus:
            raise E3PruneError(
                f"{n} gloo processes on a pod with {cpus} CPUs would share cores (and each holds a whole "
                f"copy of the student): give at most {cpus}, or raise the distill step's CPU limit",
                field="distill_processes",
            )
    return LaunchPlan(n, 1, gpus, user_threads() or max(1, cpus // n))  # the user's OMP_NUM_THREADS wins


def check_global_batch(cfg: DistillConfig, world: int, split_sequences: int) -> None:
    """The ``world`` processes' global batch fits in the distill split.

    Each optimizer step reads G = batch_size × grad_accumulation_steps × world consecutive
    sequences; with G above the split, one step would train on the same sequence more than once
    (or, without ``allow_repeat``, could not be planned at all). A single process whose batch is
    above the split runs as the step always ran it (``allow_repeat`` cycles; without it
    ``plan_steps`` names ``distill_tokens``): only what the extra processes add is refused here.
    """
    per_process = cfg.batch_size * cfg.grad_accumulation_steps
    g = per_process * world
    if world > 1 and g > split_sequences:
        name = "distill_nodes" if cfg.nodes > 1 else "distill_processes"
        fits = max(1, split_sequences // per_process)
        raise E3PruneError(
            f"{world} processes × {per_process} sequences (batch {cfg.batch_size} × accumulation "
            f"{cfg.grad_accumulation_steps}) = {g} sequences a step, but the teacher cache's distill split has "
            f"{split_sequences}: a step would read sequences twice; use at most {fits} processes in all, a smaller "
            "distill_batch_size, or a larger distill split",
            field=name,
        )


def launch_distill(cfg: DistillConfig, *, log: Log | None = None, image: str | None = None) -> dict[str, Any]:
    """Run the distill step with the processes and nodes ``cfg`` asks for; its summary (``distillation.json``).

    ``log`` receives the launched processes' output line by line (default: this process's stdout);
    ``image`` is the container image a TrainJob's pods run (``nodes`` > 1; default ``$E3PRUNE_IMAGE``).
    """
    say = log or _print
    if _inside_launch():  # already one of N processes (accelerate launch, torchrun): train here
        return distill(cfg)
    if cfg.nodes > 1:
        return _launch_trainjob(cfg, image, say)
    plan = plan_launch(cfg)
    if plan.processes == 1:
        return distill(cfg)
    return _launch_processes(cfg, plan, say)


# --------------------------------------------------------------------------- nodes: a TrainJob


def _launch_trainjob(cfg: DistillConfig, image: str | None, say: Log) -> dict[str, Any]:
    image = image or os.environ.get("E3PRUNE_IMAGE")
    if not image:
        raise E3PruneError(
            "a run over several nodes needs the container image its training pods run; the distill component "
            "passes its own (set E3PRUNE_IMAGE when calling the library directly)",
            field="distill_nodes",
        )
    check_global_batch(cfg, max(1, cfg.processes) * cfg.nodes, _split_sequences(cfg))
    from e3prune import trainjob  # imported only when a run asks for nodes (it talks to the cluster)

    trainjob.check_trainer_available()
    return trainjob.run_distill_trainjob(cfg, image=image, log=say)


def _split_sequences(cfg: DistillConfig) -> int:
    """Sequences of the cache's distill split, from its manifest alone (no shard is read)."""
    manifest = json.loads(storage.read_file(cfg.teacher_cache, "manifest.json", field="teacher_cache"))
    return int(manifest.get("splits", {}).get("distill", {}).get("sequences", 0))


# --------------------------------------------------------------------------- processes in this pod


def _launch_processes(cfg: DistillConfig, plan: LaunchPlan, say: Log) -> dict[str, Any]:
    """Check the inputs once here, start ``accelerate launch``, stream it, read back the summary."""
    from e3prune.distill_inputs import check_distill_inputs

    # bf16 without a GPU fails here; None: ACCELERATE_MIXED_PRECISION is set, and passed on as it is.
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision) or os.environ["ACCELERATE_MIXED_PRECISION"]
    # The processes check again, but a bad input fails here once instead of N times in their output.
    # (An S3 cache is downloaded now into the pod's cache; the processes find it there.)
    inputs = check_distill_inputs(cfg, plan.world, 1, probe_checkpoints=False)
    check_global_batch(cfg, plan.world, inputs.plan.split_sequences)
    inputs.store.check_writable()
    kind = f"{plan.processes} GPUs, FSDP" if plan.gpus else f"{plan.processes} gloo processes on CPU"
    say(f"distill: launching {kind}, {plan.threads} threads each; {inputs.plan.total_steps} steps")
    with tempfile.TemporaryDirectory(prefix="e3prune-distill-") as tmp:
        config_file = Path(tmp) / "distill.json"
        config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
        command = accelerate_command(plan, config_file, _free_port(), mixed_precision)
        code, tail, reported = run_streaming(command, _child_env(plan), say)
    if code != 0:
        raise launch_failed(plan.processes, code, tail, reported)
    return json.loads(storage.read_file(cfg.output, SUMMARY_FILE, field="output"))


def launch_failed(processes: int, code: int, tail: list[str], reported: list[str]) -> E3PruneError:
    """The error of a launch that exited with ``code``: what the processes reported, then the end of the output.

    A process stopped by an :class:`E3PruneError` prints ``error: <field>: <what to do>``
    (``python -m e3prune.distill``; ``reported`` holds those lines); the first leads the message and
    its field, when it is one of :class:`DistillConfig`'s, is the error's field. torchrun's own
    report (a traceback ending in "ChildFailedError") fills the last lines of the output, so they
    alone would not say what happened.
    """
    first = reported[0].removeprefix("error: ") if reported else None
    field = first.split(": ", 1)[0] if first else None
    lead = f": {first}" if first else ""
    text = "\n".join(tail)
    return E3PruneError(
        f"the {processes} distillation processes failed with exit code {code}{lead}\nthe end of their output:\n{text}",
        field=field if field in DistillConfig.model_fields else None,
    )


def accelerate_command(plan: LaunchPlan, config_file: Path, port: int, mixed_precision: str) -> list[str]:
    """``python -m accelerate.commands.launch …`` for ``plan``, every setting given as a flag.

    On CPU ``--multi_gpu`` is what starts N torchrun workers (``--cpu`` would start one); each
    runs gloo because ``distill`` makes its Accelerator with ``cpu=True`` when there is no GPU.
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(plan.processes),
        "--num_machines", "1",
        "--machine_rank", "0",
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port),
        "--num_cpu_threads_per_process", str(plan.threads),
        "--mixed_precision", mixed_precision,
        "--dynamo_backend", "no",
    ]  # fmt: skip
    if plan.gpus:
        command += ["--use_fsdp", *(x for key, value in FSDP_SETTINGS.items() for x in (f"--{key}", value))]
    else:
        command.append("--multi_gpu")
    return command + ["-m", "e3prune.distill", "--config", str(config_file), "--verbose"]


def run_streaming(command: list[str], env: dict[str, str], say: Log) -> tuple[int, list[str], list[str]]:
    """Run ``command``, pass each output line to ``say``; its exit code, last lines and ``error:`` lines.

    The child gets its own session; SIGTERM / SIGINT to this process are passed to every process
    under it (torchrun starts its workers in sessions of their own, so a process group would miss
    them), anything still running :data:`STOP_GRACE_SECONDS` later is killed, and this process
    then exits with 128 + the signal. If this process fails while waiting, the launch is killed.
    """
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True, preexec_fn=_die_with_parent,
    )  # fmt: skip
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    reported: list[str] = []  # the processes' own errors (e3prune.distill prints "error: ...")
    stopped: list[int] = []
    try:
        with _forward_signals(proc, stopped):
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if line.startswith("error: ") and len(reported) < 10:
                    reported.append(line)
                say(line)
            code = proc.wait()
    finally:
        if proc.poll() is None:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    if stopped:
        raise SystemExit(128 + stopped[0])
    return code, list(tail), reported


@contextmanager
def _forward_signals(proc: subprocess.Popen, stopped: list[int]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set in the main thread; the caller's own handling applies
        return

    def forward(signum, frame):
        if not stopped:
            stopped.append(signum)
            _signal_tree(proc.pid, signum)
            timer = threading.Timer(STOP_GRACE_SECONDS, _signal_tree, (proc.pid, signal.SIGKILL))
            timer.daemon = True
            timer.start()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal_tree(pid: int, signum: int) -> None:
    """``signum`` to ``pid`` and every process under it (collected first: a killed parent orphans its children)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when this process dies, even by SIGKILL, so that a
    killed step does not leave a launch training on (torchrun then stops its workers)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _child_env(plan: LaunchPlan) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(plan.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the step's log as they are written
    # Through a pipe every redraw of the progress bar is a line of the log (10 a second by default);
    # the main process logs its step metrics every log_every_steps anyway.
    env.setdefault("TQDM_MININTERVAL", "30")
    return env


def _inside_launch() -> bool:
    """This process is one rank of a launch already (accelerate launch, torchrun, a TrainJob's pods)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _print(line: str) -> None:
    print(line, flush=True)
