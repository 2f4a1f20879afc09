"""The fault matrix: an operator's bad day, replayed against real processes, and what each fault costs.

Each row is one fault injected for real — a SIGKILL or SIGTERM of a step or of ``e3prune run``, a
SeaweedFS or ``mlflow server`` process stopped mid-write, an object corrupted or deleted behind
its marker, a second run on the same directory, a credential in a URI, a broken checkpoint, bad
input — by the test named in the row, on small budgets. This script runs those tests (one pytest
process, real servers started by the fixtures) and writes the table with what happened: the test
asserts the outcome in the row, and that nothing already written was lost or corrupted.

    python benchmarks/faults.py [--out benchmarks/results/faults.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# fault, step, outcome the test asserts, data lost, the test that injects it
MATRIX: list[tuple[str, str, str, str, str]] = [
    ("SIGKILL of `e3prune run` (whole process group) mid-search", "search-mask",
     "rerun reuses sample/teacher outputs, resumes the search from its state; same keep-set and θ as an uninterrupted search", "none",
     "tests/test_local_run.py::test_a_killed_search_resumes_in_the_next_run_and_gives_the_same_keep_set"),
    ("promote never ran after register (gate tags and alias gone)", "promote",
     "next run detects the pending gate and runs the gate alone; no recompression, one version", "none",
     "tests/test_local_run.py::test_a_killed_search_resumes_in_the_next_run_and_gives_the_same_keep_set"),
    ("second `e3prune run` on the same output directory", "run",
     "refused at once (exit 2) naming the first run's pid; the first run is unaffected", "none",
     "tests/test_local_run.py::test_a_second_run_on_the_same_directory_is_refused_and_sigterm_stops_the_steps"),
    ("SIGTERM to `e3prune run` alone", "any step",
     "the running step process is stopped too; exit 128+15", "none",
     "tests/test_local_run.py::test_a_second_run_on_the_same_directory_is_refused_and_sigterm_stops_the_steps"),
    ("SIGKILL of `e3prune search`", "search",
     "rerun resumes from the pickle-free state; same θ and mask bit for bit", "none",
     "tests/test_layer_choice.py::test_killed_search_resumes_to_the_same_mask"),
    ("search state on S3, process stopped after a checkpoint", "search",
     "resumes from s3:// state without unpickling; identical result", "none",
     "tests/test_layer_choice.py::test_search_state_on_s3_resumes_to_the_same_mask"),
    ("SIGKILL of a 2-process distillation", "distill",
     "rerun resumes at the checkpoint step; losses after it equal an uninterrupted run's", "none",
     "tests/test_distill.py::test_killed_distillation_resumes_where_it_stopped"),
    ("half-written S3 checkpoint slot", "distill / search",
     "ignored; the other, complete slot is used", "none",
     "tests/test_resumable.py::test_s3_store_alternates_slots_and_ignores_a_half_written_one"),
    ("S3 server killed mid-export", "export",
     "clear error naming the destination; no marker, register refuses it; a retry replaces the leftover", "none",
     "components/export/tests/test_export.py::test_s3_going_down_mid_export_fails_clearly_and_leaves_nothing_complete"),
    ("MLflow server down at register", "register",
     "clear error on mlflow_tracking_uri in seconds; the export stays complete; rerun reuses the run, one version", "none",
     "tests/test_pipeline_e2e.py::test_register_fails_clearly_when_mlflow_is_down_and_reruns_alone"),
    ("object flipped behind its marker", "any reader",
     "refused, naming the file and the sha256 mismatch", "none",
     "tests/test_storage.py::test_s3_tampered_object_is_refused"),
    ("cached copy corrupted in place (same size)", "any reader",
     "detected by its changed mtime, hashed again, downloaded again", "none",
     "tests/test_storage.py::test_a_cached_copy_corrupted_in_place_is_detected_and_downloaded_again"),
    ("object deleted behind its marker", "any reader",
     "one error naming the missing file", "none",
     "tests/test_storage.py::test_a_deleted_object_is_named_in_the_error"),
    ("key with `..` parts, or a marker naming one", "any reader",
     "refused; nothing written outside the cache", "none",
     "tests/test_storage.py::test_keys_that_climb_out_of_their_prefix_are_refused"),
    ("SIGKILL mid-write (local and S3 staging)", "any writer",
     "the staging left behind is swept by the next write of that output", "none",
     "tests/test_storage.py::test_staging_left_by_a_killed_process_is_swept"),
    ("checkpoint with a missing and a stray tensor", "harden (every load)",
     "one error naming the tensors; nothing written", "none",
     "tests/test_bad_input.py::test_a_checkpoint_with_wrong_tensors_is_refused_with_one_line[missing]"),
    ("truncated model.safetensors", "harden (every load)",
     "one error line, no traceback; nothing written", "none",
     "tests/test_bad_input.py::test_a_checkpoint_with_wrong_tensors_is_refused_with_one_line[truncated]"),
    ("password in the MLflow tracking URI", "run / detect-release",
     "refused naming mlflow_tracking_uri, secret masked; credentials via env reach no log, artifact or MLflow record", "none",
     "tests/test_secrets.py"),
    ("impossible speedup (beyond L/k)", "evaluate / promote",
     "re-measured, marked unreliable; the gate rejects it naming why", "none",
     "tests/test_gate_faults.py::test_the_gate_rejects_an_unreliable_speedup_naming_why"),
    ("bad and mismatched inputs (sample output as cache, cache of another model, empty or binary source, absurd budgets)",
     "sample / search / distill", "one error line each, exit 2, before any weights load", "none",
     "tests/test_input_faults.py"),
]  # fmt: skip


def run_matrix(junit: Path) -> subprocess.CompletedProcess:
    tests = sorted({row[4] for row in MATRIX})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def outcomes(junit: Path) -> dict[str, tuple[str, float]]:
    """test node id → (passed | failed | skipped, seconds), and per file the worst of its tests."""
    result: dict[str, tuple[str, float]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{path}::{case.get('name')}"
        failed = case.find("failure") is not None or case.find("error") is not None
        state = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
        result[node] = (state, float(case.get("time", 0)))
        worst, seconds = result.get(path, ("passed", 0.0))
        result[path] = ("failed" if "failed" in (worst, state) else worst, seconds + float(case.get("time", 0)))
    return result


def table(results: dict[str, tuple[str, float]], started: str, seconds: float) -> str:
    lines = [
        "# Fault matrix",
        "",
        f"`python benchmarks/faults.py` on {started}: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}; {seconds / 60:.1f} min in all.",
        "Each fault is injected for real by the test named; 'held' means the test asserted the outcome (seconds: the test's wall time, indicative only — other jobs shared the machine).",
        "",
        "| fault | step | outcome | data lost | held | test |",
        "|---|---|---|---|---|---|",
    ]
    for fault, step, outcome, lost, test in MATRIX:
        state, secs = _lookup(results, test)
        held = {"passed": f"yes ({secs:.0f} s)", "failed": "**NO**"}.get(state, state)
        lines.append(f"| {fault} | {step} | {outcome} | {lost} | {held} | `{test}` |")
    return "\n".join(lines) + "\n"


def _lookup(results: dict[str, tuple[str, float]], test: str) -> tuple[str, float]:
    if test in results:
        return results[test]
    base = test.split("[")[0]
    matches = [v for k, v in results.items() if k.split("[")[0] == base]
    if not matches:
        return ("not run", 0.0)
    return ("failed" if any(s == "failed" for s, _ in matches) else "passed", sum(t for _, t in matches))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "faults.md")
    args = parser.parse_args()
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "faults.xml"
        proc = run_matrix(junit)
        results = outcomes(junit)
    text = table(results, started, time.time() - t0)
    args.out.write_text(text)
    print(text)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
