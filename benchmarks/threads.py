"""Threads follow the pod: two search steps side by side, before and after ``e3prune.threads``.

Each case runs real ``python -m e3prune.cli search`` processes on the shipped reference model,
over a small teacher cache built first (``e3prune sample`` + ``e3prune teacher-logits``):

(a) one search alone on the whole machine;
(b) two at once, each limited to one CPU by its affinity (``os.sched_setaffinity`` before exec,
    as ``taskset -c 0`` / ``-c 1``), with ``E3PRUNE_THREADS_FOLLOW_QUOTA=0`` (torch's own sizing,
    the behaviour before the fix);
(c) the same with the fix (the default);
(d) two at once, unpinned, with ``E3PRUNE_THREADS_FOLLOW_QUOTA=0``: each torch starts one thread
    per core, as in a pod whose CPU quota is below the node's cores;
(e) the same with each process at one thread (``OMP_NUM_THREADS=1``), what the fix sets under a
    1-CPU quota (a cgroup quota cannot be created here without changing the machine's cgroups).

Rounds interleave the cases (a, b, c, d, e, a, ...) so drifts of a shared machine hit all alike;
the table reports medians. Seconds per search step are the step's own ``search_seconds / steps``
(``search.json``; ``--init zeros --no-final-selection`` keep the rest short); the wall time of each process (start, model load, KL init, final selection)
is beside it. The threads column is what each search logged (``threads: N (...)``) or, for the
opt-out, torch's pool size it reported. Writes the ``## Threads follow the pod`` section of
``benchmarks/results/scale.md`` (other sections of that file are kept). Usage:

    python benchmarks/threads.py [--repeats 3] [--steps 12] [--cases abcde] [--out benchmarks/results/scale.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from e3prune.reference import default_model

HEADING = "## Threads follow the pod"
CASES = {
    "a": ("one search alone, whole machine, fix on", 1, False, {}),
    "b": ("two at once, one CPU each (affinity), fix off", 2, True, {"E3PRUNE_THREADS_FOLLOW_QUOTA": "0"}),
    "c": ("two at once, one CPU each (affinity), fix on", 2, True, {}),
    "d": ("two at once, unpinned, fix off (torch: one thread per core)", 2, False, {"E3PRUNE_THREADS_FOLLOW_QUOTA": "0"}),
    "e": ("two at once, unpinned, one thread each (as the fix under a 1-CPU quota)", 2, False, {"OMP_NUM_THREADS": "1"}),
}

READING = (
    "Reading: torch's OpenMP runtime already sizes its pool from the affinity mask (`taskset`), so (b) and (c) "
    "both run one thread per search and differ only by noise; affinity cannot show the fix. A CPU quota is what "
    "torch does not see: (d) is two searches that each start one thread per core on CPUs they share, as in a pod "
    "whose quota is below the node's cores, and (e) is the one thread per CPU the fix sets there (from `cpu.max` "
    "or `cpu.cfs_quota_us`; the fake-cgroup tests in `tests/test_threads.py` check that it reads them)."
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--split-tokens", type=int, default=4096, help="tokens of the sampled search split")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12, help="search budget = steps × batch × seq_len tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="abcde")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--out", default="benchmarks/results/scale.md")
    return ap.parse_args()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any thread settings, plus the case's."""
    drop = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "E3PRUNE_THREADS_FOLLOW_QUOTA"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "e3prune.cli", *args], check=True, env=child_env({}))


def prepare(args: argparse.Namespace, work: Path) -> Path:
    data, cache = work / "data", work / "cache"
    cli("sample", "--seq-len", str(args.seq_len), "--search-tokens", str(args.split_tokens),
        "--distill-tokens", "0", "--eval-tokens", "0", "--output", str(data), "--overwrite")  # fmt: skip
    cli("teacher-logits", "--model", args.model, "--data", str(data), "--splits", "search",
        "--output", str(cache), "--overwrite")  # fmt: skip
    return cache


def start(args: argparse.Namespace, cache: Path, out: Path, cpu: int | None, env: dict[str, str]) -> subprocess.Popen:
    tokens = args.steps * args.batch_size * args.seq_len
    cmd = [sys.executable, "-m", "e3prune.cli", "-v", "search", "--model", args.model, "--teacher-cache", str(cache),
           "--output", str(out), "--state", str(out.with_name(out.name + "-state")), "--search-tokens", str(tokens),
           "--batch-size", str(args.batch_size), "--init", "zeros", "--no-final-selection", "--selection-method", "e3", "--overwrite"]  # fmt: skip
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    return subprocess.Popen(cmd, env=child_env(env), preexec_fn=pin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def run_case(args: argparse.Namespace, cache: Path, work: Path, case: str, round_: int) -> list[dict]:
    _, n, pinned, env = CASES[case]
    cpus = os.sched_getaffinity(0)
    started = time.perf_counter()
    procs = []
    for i in range(n):
        cpu = sorted(cpus)[i % len(cpus)] if pinned else None
        out = work / "runs" / f"{case}{round_}-{i}"
        procs.append((out, started, start(args, cache, out, cpu, env)))
    results = []
    for out, t0, proc in procs:
        log, _ = proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"search {out.name} failed:\n{log[-3000:]}")
        result = json.loads((out / "search.json").read_text())
        m = re.search(r"threads: (\d+) \(([^)]*)\)", log)
        results.append({
            "threads": int(m.group(1)) if m else None,
            "why": m.group(2) if m else "",
            "step_s": result["search_seconds"] / result["steps"],
            "search_s": result["search_seconds"],
            "wall_s": wall,
            "steps": result["steps"],
        })  # fmt: skip
    return results


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")  # fmt: skip
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")  # fmt: skip


def section(args: argparse.Namespace, rows: dict[str, list[dict]], load: tuple[str, str], seconds: float) -> str:
    tokens = args.steps * args.batch_size * args.seq_len
    lines = [
        HEADING,
        "",
        f"Generated by `python benchmarks/threads.py --repeats {args.repeats} --steps {args.steps} --cases {args.cases}`: real "
        f"`e3prune search` processes on the shipped reference model, teacher cache of {args.split_tokens} tokens "
        f"(seq_len {args.seq_len}), search budget {tokens} tokens ({args.steps} steps × batch {args.batch_size} × "
        f"{args.seq_len}; `--init zeros --no-final-selection`, so that the process is mostly the search's own steps). "
        f"Medians over {args.repeats} interleaved rounds, over both processes of a pair.",
        "",
        f"Machine: {machine()}. **The machine was shared while measuring** (other engineers ran tests; load "
        f"average {load[0]} at the start, {load[1]} at the end), so absolute numbers are noisy; {seconds / 60:.0f} min "
        "in all.",
        "",
        "| case | what | threads per search (logged) | s per search step | search s | wall s per process |",
        "|---|---|---|---|---|---|",
    ]
    for case, results in rows.items():
        what = CASES[case][0]
        threads = sorted({r["threads"] for r in results if r["threads"] is not None})
        med = {k: statistics.median(r[k] for r in results) for k in ("step_s", "search_s", "wall_s")}
        lines.append(f"| ({case}) | {what} | {', '.join(map(str, threads)) or '?'} | {med['step_s']:.3f} | "
                     f"{med['search_s']:.1f} | {med['wall_s']:.1f} |")  # fmt: skip
    lines += ["", READING]
    lines += ["", "Logged by each case's first search:", ""]
    lines += [f"- ({case}) `threads: {results[0]['threads']} ({results[0]['why']})`" for case, results in rows.items()]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this section; other sections of the file are kept."""
    old = path.read_text() if path.exists() else "# Scaling\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    args = parse_args()
    began = time.time()
    load_start = "%.1f" % os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="e3-threads-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        cache = prepare(args, work)
        rows: dict[str, list[dict]] = {case: [] for case in args.cases}
        for round_ in range(args.repeats):
            for case in args.cases:
                rows[case] += run_case(args, cache, work, case, round_)
                r = rows[case][-1]
                print(f"round {round_} ({case}): {r['step_s']:.3f} s/step, wall {r['wall_s']:.1f} s, threads {r['threads']}",
                      flush=True)  # fmt: skip
    text = section(args, rows, (load_start, "%.1f" % os.getloadavg()[0]), time.time() - began)
    write_section(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
