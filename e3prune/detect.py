"""The first step of a run: validate every parameter, find the newest release, and decide.

:func:`detect_release` is what the ``detect_release`` component and ``e3prune run`` call. It
rejects a bad parameter in seconds (naming it), resolves the source to its newest release pinned
to an immutable revision, asks the registry whether that release was compressed at this ratio
already, and hands every later step its validated parameters (:meth:`RunSettings.step_params`).

A release is done only when its version holds a gate decision. A version registered without one
(``promote`` killed or failed after ``register``) is not "nothing new": the release is not
compressed again (``is_new`` stays false), ``pending_gate_version`` names the version, and the plan
says that its gate never ran and the exact ``e3prune promote`` command that runs it;
:func:`e3prune.gate.gate_pending` runs that gate alone (docs/operations.md, "When a step fails").
Detection itself only reads: it never writes to the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from e3prune import releases, sources
from e3prune.gate import gate_decision, pending_gate_config, promote_command
from e3prune.model_io import load_config
from e3prune.run_config import RunSettings
from e3prune.selection import n_remove_for


@dataclass(frozen=True)
class Detection:
    release: releases.Release
    is_new: bool  # the rest of the pipeline runs only then
    existing_version: str  # the registered version that holds this release already, or ""
    plan: str  # Markdown: what the run will do, or why it skips
    run_config: dict[str, Any]  # every parameter and the resolved release (the register step logs it)
    steps: dict[str, dict[str, Any]]  # each step's validated parameters, by step
    pending_gate_version: str = ""  # existing_version when its gate never ran (no decision tag), else ""

    @property
    def teacher_shard_ids(self) -> list[int]:
        """The teacher tasks the pipeline fans out over (``dsl.ParallelFor``): 0 .. teacher_shards - 1."""
        return list(range(self.steps["teacher"]["shards"]))

    @property
    def action(self) -> str:
        """``compress``, ``gate`` (the gate of ``pending_gate_version`` alone) or ``skip``."""
        return "compress" if self.is_new else "gate" if self.pending_gate_version else "skip"


def detect_release(cfg: RunSettings) -> Detection:
    steps = cfg.step_params()  # every parameter, before the registry or the source is touched
    tracking = cfg.mlflow_tracking_uri or None
    release = releases.newest_release(cfg.source_model, cfg.source_revision, tracking)
    n_layers = load_config(sources.fetch(release.uri, release.revision), field="source_model").num_hidden_layers
    n_remove = n_remove_for(cfg.remove_ratio, n_layers)  # a ratio that rounds to no layer fails here
    done = releases.compressed_version(cfg.registered_model_name, release, cfg.remove_ratio, tracking)
    is_new = done is None or cfg.force
    pending = "" if is_new or gate_decision(done) is not None else str(done.version)  # forced: register reuses it
    found = Detection(
        release=release,
        is_new=is_new,
        existing_version="" if done is None else str(done.version),
        plan="",
        run_config={**cfg.model_dump(), "source_uri": release.uri, "resolved_revision": release.revision},
        steps=steps,
        pending_gate_version=pending,
    )
    return replace(found, plan=_plan(cfg, found, n_layers, n_remove))


def _plan(cfg: RunSettings, found: Detection, n_layers: int, n_remove: int) -> str:
    release, done = found.release, found.existing_version
    lines = [
        "## Release",
        "",
        f"- **Source:** `{cfg.source_model}` → `{release.uri}` at revision `{release.revision}`",
        f"- **Layers:** {n_layers}, removing {n_remove} ({cfg.remove_ratio:.0%}), keeping {n_layers - n_remove}",
    ]
    lines += [f"- **Repeated data:** {warning}" for warning in cfg.repeat_warnings()]
    if done:
        lines.append(f"- **Already compressed:** `{cfg.registered_model_name}` version {done}")
    if found.action == "gate":
        command = promote_command(pending_gate_config(found))
        lines.append(f"- **Decision:** gate only: registered as version {done} but its gate never ran")
        lines.append(f"- **The gate runs now** (as `{command}` would)")
    else:
        decision = {"compress": "compress (forced)" if done else "compress", "skip": "skip: nothing new"}
        lines.append(f"- **Decision:** {decision[found.action]}")
    return "\n".join(lines) + "\n"
