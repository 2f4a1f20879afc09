"""Calling a component's Python function the way KFP's executor does, for the tests.

``component.python_func(...)`` needs every output: artifacts (``dsl.Artifact`` objects at a
local path) and ``OutputPath`` parameters (a file the function writes). This builds them in a
fresh directory and reads the parameters back.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace


def call_detect_release(tmp_path: Path, **params) -> SimpleNamespace:
    from kfp import dsl

    from e3prune.run_config import RunConfig
    from e3prune_components.detect_release.component import detect_release
    from e3prune_components.detect_release.generate import LIST_OUTPUTS, STEP_OUTPUTS, TEXT_OUTPUTS

    d = tmp_path / f"detect-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    steps = [f"{s}_params" for s in STEP_OUTPUTS]
    paths = {name: str(d / name) for name in (*TEXT_OUTPUTS, *LIST_OUTPUTS, *steps)}
    action = detect_release.python_func(
        **{**RunConfig().model_dump(), **params},
        run_config=dsl.Artifact(name="run_config", uri=str(d / "run_config.json"), metadata={}),
        plan=dsl.Markdown(name="plan", uri=str(d / "plan.md"), metadata={}),
        **paths,
    )
    values = {name: Path(p).read_text() for name, p in paths.items()}
    params = {s: json.loads(values[f"{s}_params"]) for s in STEP_OUTPUTS}
    return SimpleNamespace(
        action=action,
        is_new=action == "compress",
        pending_gate_version=values["pending_gate_version"],
        source_uri=values["source_uri"],
        source_revision=values["source_revision_resolved"],
        existing_version=values["existing_version"],
        plan=(d / "plan.md").read_text(),
        run_config=d / "run_config.json",
        params=params,
        teacher_shard_ids=json.loads(values["teacher_shard_ids"]),
    )
