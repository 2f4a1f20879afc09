"""Compile the pipeline and every component to the YAML files committed beside them.

``e3prune compile`` (or ``python -m e3prune_pipelines.compile``) first regenerates
``components/detect_release/component.py`` from ``RunConfig`` (the one component that takes every
pipeline parameter), then rewrites ``pipelines/e3_pruner/pipeline.yaml`` (upload it in the Kubeflow UI) and
``components/<name>/component.yaml`` (reuse a step in another pipeline) with the README beside
it (inputs and outputs from the component's interface). ``--check`` compiles
into a temporary directory and fails on any difference instead, which is what the drift test
and CI run.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import tempfile
from pathlib import Path

COMPONENTS = (
    "detect_release",
    "sample_data",
    "teacher_logits",
    "join_teacher_cache",
    "search_mask",
    "harden_mask",
    "distill",
    "evaluate",
    "export",
    "register",
    "promote",
)


def targets() -> dict[str, tuple[object, Path]]:
    """name -> (the compiled object, where its YAML lives in the source tree)."""
    import e3prune_components
    import e3prune_pipelines
    from e3prune_pipelines.e3_pruner.pipeline import e3_pruner_gpu_pipeline, e3_pruner_pipeline

    comp_root = Path(e3prune_components.__file__).parent
    here = Path(e3prune_pipelines.__file__).parent / "e3_pruner"
    out = {"pipeline": (e3_pruner_pipeline, here / "pipeline.yaml"), "pipeline-gpu": (e3_pruner_gpu_pipeline, here / "pipeline-gpu.yaml")}
    for name in COMPONENTS:
        module = importlib.import_module(f"e3prune_components.{name}.component")
        out[name] = (getattr(module, name), comp_root / name / "component.yaml")
    return out


def _type(t: str) -> str:
    return t.split("@")[0].removeprefix("system.")


def component_readme(name: str, component) -> str:
    """The component's README, generated from its interface so it cannot drift from it."""
    spec = component.component_spec
    inputs = ["| name | type | default | description |", "|---|---|---|---|"]
    for key, i in spec.inputs.items():
        default = "" if i.default is None else f"`{i.default!r}`"
        inputs.append(f"| `{key}` | {_type(i.type)} | {default} | {getattr(i, 'description', '') or ''} |")
    import docstring_parser  # a kfp dependency: KFP reads input descriptions the same way

    doc = docstring_parser.parse(component.python_func.__doc__ or "")
    described = {p.arg_name: p.description for p in doc.params}
    returns = ""
    if doc.returns:  # the parser takes "first_field:" of the Returns section for a type name
        head = f"{doc.returns.type_name}: " if doc.returns.type_name else ""
        returns = head + (doc.returns.description or "")
    for line in returns.splitlines():  # "name: description" per NamedTuple field
        key, _, text = line.strip().partition(": ")
        described.setdefault(key, text)
    outputs = ["| name | type | description |", "|---|---|---|"]
    for key, o in (spec.outputs or {}).items():
        outputs.append(f"| `{key}` | {_type(o.type)} | {described.get(key, '')} |")
    description = (spec.description or "").strip()
    return (
        f"# {name}\n\n{description}\n\n"
        "Image: the one setting in `components/image.py`; nothing is installed at run time. "
        "S3 endpoint and credentials come from the pod's environment (`AWS_*`).\n\n"
        "## Inputs\n\n" + "\n".join(inputs) + "\n\n## Outputs\n\n" + "\n".join(outputs) + "\n\n"
        "## Use it in another pipeline\n\n"
        "```python\n"
        "from kfp import components\n\n"
        f'{name} = components.load_component_from_file("components/{name}/component.yaml")\n'
        "```\n\n"
        f"or `from e3prune_components.{name}.component import {name}` with the package installed. "
        "`e3prune compile` regenerates this file and `component.yaml`; do not edit them by hand.\n"
    )


def regenerate_sources() -> bool:
    """Rewrite the generated component source; reload what imported the stale one. True if it changed."""
    from e3prune_components.detect_release import generate

    if not generate.write():
        return False
    for module in ("e3prune_components.detect_release.component", "e3prune_pipelines.e3_pruner.pipeline"):
        if module in sys.modules:
            importlib.reload(sys.modules[module])
    return True


def compile_all(into: Path | None = None) -> dict[str, Path]:
    """Compile everything; into ``into`` (flat) when given, else over the committed files."""
    from kfp import compiler

    written = {}
    for name, (obj, path) in targets().items():
        dest = into / f"{name}.yaml" if into else path
        compiler.Compiler().compile(obj, str(dest))
        written[name] = dest
        if not name.startswith("pipeline"):
            readme = into / f"{name}.README.md" if into else path.parent / "README.md"
            readme.write_text(component_readme(name, obj))
            written[f"{name} README"] = readme
    return written


def check() -> list[str]:
    """Names whose committed YAML differs from a fresh compile, with a short diff each."""
    from e3prune_components.detect_release import generate

    problems = []
    if not generate.is_current():
        problems.append(f"{generate.TARGET} is out of date with RunConfig; run `e3prune compile`")
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_all(Path(tmp))
        pairs = [(fresh[name], committed) for name, (_, committed) in targets().items()]
        pairs += [(fresh[f"{n} README"], c.parent / "README.md") for n, (_, c) in targets().items() if not n.startswith("pipeline")]
        for fresh_path, committed in pairs:
            new = fresh_path.read_text()
            old = committed.read_text() if committed.is_file() else ""
            if new != old:
                diff = "".join(
                    list(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(committed), "fresh"))[:40]
                )
                problems.append(f"{committed} is out of date; run `e3prune compile`:\n{diff}")
    return problems


def compile_gpu(args: argparse.Namespace) -> int:
    """``e3prune compile --gpu-output FILE …``: the GPU pipeline with other counts, labels or taints."""
    from kfp import compiler

    from e3prune.errors import E3PruneError
    from e3prune_pipelines.e3_pruner.cluster import Toleration, gpu_cluster
    from e3prune_pipelines.e3_pruner.pipeline import GPU_PIPELINE_NAME, make_pipeline

    if args.gpus < 1 or args.distill_gpus < 1:
        raise E3PruneError(f"must be at least 1, got {min(args.gpus, args.distill_gpus)}", field="gpus")
    try:
        selector = None if args.node_selector is None else dict(s.split("=", 1) for s in args.node_selector)
        tolerations = (Toleration("nvidia.com/gpu"),) if args.toleration is None else tuple(
            Toleration.parse(t) for t in args.toleration
        )
    except ValueError as exc:
        field = "toleration" if "toleration" in str(exc) else "node_selector"
        raise E3PruneError(f"{exc}; give KEY=VALUE for a node label", field=field) from None
    cluster = gpu_cluster(args.gpus, args.distill_gpus, selector, tolerations, args.shm_size)
    compiler.Compiler().compile(make_pipeline(cluster, GPU_PIPELINE_NAME), str(args.gpu_output))
    print(f"pipeline-gpu: {args.gpu_output} ({args.gpus} GPU(s) per heavy step, {args.distill_gpus} for distill)")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``e3prune compile`` (imports nothing heavy: the CLI builds its parser with it)."""
    parser.add_argument("--check", action="store_true", help="fail if the committed YAML differs from a fresh compile")
    gpu = parser.add_argument_group("a GPU pipeline of your own (instead of the committed files)")
    gpu.add_argument("--gpu-output", type=Path, help="write a GPU pipeline with the settings below to this file")
    gpu.add_argument("--gpus", type=int, default=1, help="GPUs per heavy step (default: 1)")
    gpu.add_argument("--distill-gpus", type=int, default=1, help="GPUs of the distill step (default: 1)")
    gpu.add_argument("--node-selector", action="append", default=None, metavar="KEY=VALUE",
                     help="node label the GPU steps require; repeat (default: nvidia.com/gpu.present=true)")  # fmt: skip
    gpu.add_argument("--toleration", action="append", default=None, metavar="KEY[=VALUE][:EFFECT]",
                     help="taint the GPU steps tolerate; repeat (default: nvidia.com/gpu:NoSchedule)")  # fmt: skip
    gpu.add_argument("--shm-size", default="16Gi", help="memory-backed /dev/shm of the GPU steps (default: 16Gi)")


def run(args: argparse.Namespace) -> int:
    if args.gpu_output:
        return compile_gpu(args)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    if regenerate_sources():
        print("detect_release: regenerated its component.py from RunConfig")
    for name, path in compile_all().items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e3prune compile", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
