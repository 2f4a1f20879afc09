"""Threads follow the pod (``e3prune/threads.py``): fake cgroup v1 / v2 trees, affinity, the user's
``OMP_NUM_THREADS``, malformed files, and a real subprocess pinned to one CPU."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e3prune import threads
from e3prune.threads import cpu_limits, cpu_quota, follow_cpu_quota

V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTINFO = (
    "31 23 0:27 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755\n"
    "35 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
    "36 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,memory\n"
)
POD = "/kubepods/burstable/pod1234/c0ffee"


@pytest.fixture
def machine(monkeypatch):
    """A 64-core node with every core in the affinity mask (tests change what they need)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(threads, "_exported", {})
    intra, interop_calls = torch.get_num_threads(), []
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: interop_calls.append(n))
    yield interop_calls
    torch.set_num_threads(intra)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(tmp_path: Path, cpu_max: str | None, *, cgroup: str = "/", mountinfo: str = V2_MOUNTINFO) -> tuple[Path, Path]:
    root, proc = tmp_path / "root", tmp_path / "proc"
    write(proc / "self" / "cgroup", f"0::{cgroup}\n")
    write(proc / "self" / "mountinfo", mountinfo)
    leaf = root / "sys/fs/cgroup" / cgroup.lstrip("/")
    leaf.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        write(leaf / "cpu.max", cpu_max)
    return root, proc


def v1_tree(tmp_path: Path, quota: str, period: str = "100000\n", *, cgroup: str = "/") -> tuple[Path, Path]:
    root, proc = tmp_path / "root", tmp_path / "proc"
    write(proc / "self" / "cgroup", f"12:memory:{cgroup}\n4:cpu,cpuacct:{cgroup}\n1:name=systemd:{cgroup}\n0::/\n")
    write(proc / "self" / "mountinfo", V1_MOUNTINFO)
    leaf = root / "sys/fs/cgroup/cpu,cpuacct" / cgroup.lstrip("/")
    write(leaf / "cpu.cfs_quota_us", quota)
    write(leaf / "cpu.cfs_period_us", period)
    return root, proc


# cgroup v2


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("400000 100000\n", 4), ("max 100000\n", 64), ("150000 100000\n", 2), ("50000 100000\n", 1), ("200000\n", 2)],
)
def test_v2_cpu_max(tmp_path, machine, cpu_max, expected):
    assert cpu_quota(*v2_tree(tmp_path, cpu_max)) == expected


def test_v2_pod_cgroup_and_its_ancestors(tmp_path, machine):
    """The container's own cgroup is found from /proc/self/cgroup; the tightest ancestor wins."""
    root, proc = v2_tree(tmp_path, "max 100000\n", cgroup=POD)
    write(root / "sys/fs/cgroup/kubepods/burstable/pod1234/cpu.max", "300000 100000\n")
    assert cpu_quota(root, proc) == 3
    write(root / "sys/fs/cgroup" / POD.lstrip("/") / "cpu.max", "100000 100000\n")
    assert cpu_quota(root, proc) == 1


def test_v2_without_cgroup_namespace(tmp_path, machine):
    """The mount's root is the container's cgroup (no namespace): /proc/self/cgroup shows the host path."""
    mountinfo = f"30 23 0:26 {POD} /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"
    root, proc = v2_tree(tmp_path, None, cgroup=POD, mountinfo=mountinfo)
    write(root / "sys/fs/cgroup/cpu.max", "200000 100000\n")
    assert cpu_limits(root, proc).cgroup == 2.0
    assert cpu_quota(root, proc) == 2


def test_v2_without_mountinfo_reads_the_usual_place(tmp_path, machine):
    root, proc = v2_tree(tmp_path, "400000 100000\n")
    (proc / "self" / "mountinfo").unlink()
    assert cpu_quota(root, proc) == 4


# cgroup v1


def test_v1_quota(tmp_path, machine):
    limits = cpu_limits(*v1_tree(tmp_path, "200000\n", cgroup=POD))
    assert (limits.cgroup, limits.cgroup_file, limits.cpus) == (2.0, "cpu.cfs_quota_us", 2)


def test_v1_unlimited(tmp_path, machine):
    limits = cpu_limits(*v1_tree(tmp_path, "-1\n"))
    assert limits.cgroup is None
    assert limits.cpus == 64


def test_v1_and_v2_the_smaller_wins(tmp_path, machine):
    root, proc = v1_tree(tmp_path, "600000\n")
    write(proc / "self" / "mountinfo", V1_MOUNTINFO + V2_MOUNTINFO.replace("/sys/fs/cgroup ", "/sys/fs/cgroup/unified "))
    write(root / "sys/fs/cgroup/unified/cpu.max", "250000 100000\n")
    limits = cpu_limits(root, proc)
    assert (limits.cgroup, limits.cgroup_file, limits.cpus) == (2.5, "cpu.max", 3)


# affinity, cores


def test_affinity_smaller_than_quota_wins(tmp_path, machine, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 9})
    assert cpu_quota(*v2_tree(tmp_path, "400000 100000\n")) == 2


def test_no_cgroup_at_all_means_cores(tmp_path, machine):
    assert cpu_quota(tmp_path / "nothing", tmp_path / "no-proc") == 64


# malformed files fall back, never crash


@pytest.mark.parametrize(
    "cpu_max", ["", "\n", "lots\n", "400000 100000 7\n", "400000 0\n", "-5 100000\n", "4.5 100000\n", "\xff\xfe"]
)
def test_malformed_cpu_max_is_ignored(tmp_path, machine, cpu_max):
    assert cpu_quota(*v2_tree(tmp_path, cpu_max)) == 64


@pytest.mark.parametrize(("quota", "period"), [("abc\n", "100000\n"), ("200000\n", "0\n"), ("200000\n", "\n"), ("-7\n", "100000\n")])
def test_malformed_v1_files_are_ignored(tmp_path, machine, quota, period):
    assert cpu_quota(*v1_tree(tmp_path, quota, period)) == 64


def test_malformed_proc_files_are_ignored(tmp_path, machine):
    root, proc = v2_tree(tmp_path, "400000 100000\n")
    write(proc / "self" / "mountinfo", "garbage\n- - -\n1 2 3\n" + V2_MOUNTINFO)
    write(proc / "self" / "cgroup", "nonsense\n0::relative\n::\n0::/\n")
    assert cpu_quota(root, proc) == 4
    write(proc / "self" / "cgroup", "nonsense only\n")
    assert cpu_quota(root, proc) == 64


def test_a_cgroup_path_escaping_the_mount_stays_inside(tmp_path, machine):
    root, proc = v2_tree(tmp_path, "300000 100000\n")
    write(proc / "self" / "cgroup", "0::/../../etc\n")
    assert cpu_quota(root, proc) == 3


# follow_cpu_quota


def test_follow_sets_torch_and_exports_for_children(tmp_path, machine, caplog):
    with caplog.at_level(logging.INFO, logger="e3prune.threads"):
        n = follow_cpu_quota(*v2_tree(tmp_path, "150000 100000\n"))
    assert n == 2 == torch.get_num_threads()
    assert machine == [2]  # the inter-op pool too
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "2"
    assert [r.getMessage() for r in caplog.records] == ["threads: 2 (cgroup cpu.max 1.5, affinity 64, cores 64)"]


def test_follow_again_in_the_same_process_follows_again(tmp_path, machine):
    """A second step in one process is not mistaken for a user's OMP_NUM_THREADS (this process exported it)."""
    assert follow_cpu_quota(*v2_tree(tmp_path / "a", "200000 100000\n")) == 2
    assert follow_cpu_quota(*v2_tree(tmp_path / "b", "100000 100000\n")) == 1
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_interop_already_set_is_not_an_error(tmp_path, machine, monkeypatch):
    def refuse(n):
        raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", refuse)
    assert follow_cpu_quota(*v2_tree(tmp_path, "100000 100000\n")) == 1
    assert torch.get_num_threads() == 1


def test_users_omp_num_threads_is_respected(tmp_path, machine, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    set_calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_calls.append(n))
    with caplog.at_level(logging.INFO, logger="e3prune.threads"):
        n = follow_cpu_quota(*v2_tree(tmp_path, "100000 100000\n"))
    assert n == torch.get_num_threads()
    assert set_calls == [] and machine == []
    assert os.environ["OMP_NUM_THREADS"] == "3" and "MKL_NUM_THREADS" not in os.environ
    assert "OMP_NUM_THREADS=3 set by the user" in caplog.text


def test_opt_out_leaves_torch_alone(tmp_path, machine, monkeypatch, caplog):
    monkeypatch.setenv(threads.OPT_OUT_ENV, "0")
    set_calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_calls.append(n))
    with caplog.at_level(logging.INFO, logger="e3prune.threads"):
        n = follow_cpu_quota(*v2_tree(tmp_path, "100000 100000\n"))
    assert n == torch.get_num_threads()
    assert set_calls == [] and machine == []
    assert "OMP_NUM_THREADS" not in os.environ
    assert "E3PRUNE_THREADS_FOLLOW_QUOTA=0" in caplog.text


# real processes

CHILD = """
import json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # taskset -c <one CPU>, before torch starts
import torch
from e3prune.threads import follow_cpu_quota
n = follow_cpu_quota()
print(json.dumps({"n": n, "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "omp": os.environ.get("OMP_NUM_THREADS")}))
"""


def run_child(code: str, **env: str) -> dict:
    child_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.OPT_OUT_ENV)}
    child_env.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pinned_to_one_cpu_in_a_real_process():
    assert run_child(CHILD) == {"n": 1, "threads": 1, "interop": 1, "omp": "1"}


def test_users_omp_num_threads_in_a_real_process():
    """The user's 2 wins over the one-CPU affinity: torch sized its pool from it, and it is left so
    (torch itself caps the pool at ``os.cpu_count()``, so the test asks for 2, which every runner has)."""
    if (os.cpu_count() or 1) < 2:
        pytest.fail("this test needs a machine with at least 2 cores")
    result = run_child(CHILD, OMP_NUM_THREADS="2")
    assert (result["n"], result["threads"], result["omp"]) == (2, 2, "2")
