"""The configuration reference (docs/configuration.md), generated from the step configs so that
it cannot drift from them; a test compares the committed file with a fresh rendering."""

from __future__ import annotations

import typing

from pydantic import BaseModel


def _steps() -> list[tuple[str, str, type[BaseModel]]]:
    from e3prune.data import SampleConfig, SourceSpec
    from e3prune.distill import DistillConfig
    from e3prune.evaluate import EvaluateConfig
    from e3prune.export import ExportConfig
    from e3prune.harden import HardenConfig
    from e3prune.registry import PromoteConfig, RegisterConfig
    from e3prune.run_config import RunConfig
    from e3prune.search import SearchConfig
    from e3prune.selection import SelectConfig
    from e3prune.teacher import TeacherLogitsConfig

    return [
        ("sample", "e3prune.data.SampleConfig", SampleConfig),
        ("sample: one source", "e3prune.data.SourceSpec", SourceSpec),
        ("teacher-logits", "e3prune.teacher.TeacherLogitsConfig", TeacherLogitsConfig),
        ("search", "e3prune.search.SearchConfig", SearchConfig),
        ("select", "e3prune.selection.SelectConfig", SelectConfig),
        ("harden", "e3prune.harden.HardenConfig", HardenConfig),
        ("distill", "e3prune.distill.DistillConfig", DistillConfig),
        ("evaluate", "e3prune.evaluate.EvaluateConfig", EvaluateConfig),
        ("export", "e3prune.export.ExportConfig", ExportConfig),
        ("register", "e3prune.registry.RegisterConfig", RegisterConfig),
        ("promote", "e3prune.registry.PromoteConfig", PromoteConfig),
        ("run: the pipeline's parameters", "e3prune.run_config.RunConfig", RunConfig),
    ]


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        name = getattr(origin, "__name__", str(origin)).replace("UnionType", "union")
        return f"{name}[{args}]" if name != "union" else args.replace(", ", " \\| ")
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


def render() -> str:
    from e3prune.reference import default_model

    lines = [
        "# Configuration reference",
        "",
        "Generated from the step configs by `e3prune config-docs` (a test fails when this file drifts).",
        "Every step validates its whole configuration before any heavy work; a bad value gives one",
        "`error: <field>: …` naming what is allowed. CLI flags are the field names with dashes.",
        "",
    ]
    for step, path, cls in _steps():
        lines += [
            f"## {step} (`{path}`)",
            "",
            (cls.__doc__ or "").strip().splitlines()[0],
            "",
            "| field | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for name, field in cls.model_fields.items():
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = "reference model" if value == default_model() else f"`{value!r}`"
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {default} | {desc} |")
        lines.append("")
    return "\n".join(lines)
