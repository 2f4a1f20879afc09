"""What a person reads about a run: flat metric names, the search plot, the final summary.

Used by the pipeline's steps (Kubeflow ``Metrics``/``HTML``/``Markdown`` outputs), the MLflow
registration (metric keys and version tags) and ``e3prune run``'s closing summary, so all three
show the same numbers under the same names.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics.json`` of the evaluate step as ``{dotted.name: number}``.

    Names: ``<role>.perplexity`` / ``.loss`` / ``.layers`` / ``.parameters`` for teacher, pruned
    and student; ``<role>.top1_agreement`` / ``.kl`` / ``.perplexity_ratio`` / ``.gap_closed`` for
    the compared roles; ``speedup.prefill`` / ``speedup.decode`` (student, else pruned, over the
    teacher); ``lm_eval.<task>.<role>.<metric>``.
    """
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)

    for role, m in (metrics.get("models") or {}).items():
        for name in ("perplexity", "loss", "layers", "parameters"):
            put(f"{role}.{name}", (m or {}).get(name))
    for role, c in (metrics.get("comparisons") or {}).items():
        for name, value in (c or {}).items():
            put(f"{role}.{name}", value)
    speed = metrics.get("speed") or {}
    for role, phases in (speed.get("speedup") or {}).items():
        for phase, value in phases.items():
            put(f"speedup.{phase}", value)  # one timed role: the student, or the pruned model
    for role, m in (speed.get("models") or {}).items():
        put(f"{role}.prefill_tokens_per_second", m.get("prefill_tokens_per_second"))
        put(f"{role}.decode_tokens_per_second", m.get("decode_tokens_per_second"))
    for task, roles in (metrics.get("lm_eval") or {}).items():
        for role, values in roles.items():
            for name, value in (values or {}).items():
                if name != "samples":
                    put(f"lm_eval.{task}.{role}.{name}", value)
    return out


def read_trajectory(search_dir: Path) -> list[dict[str, Any]]:
    path = search_dir / "trajectory.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def search_plot_png(search: Mapping[str, Any], trajectory: list[Mapping[str, Any]]) -> bytes:
    """Two panels: θ per layer over the steps (kept layers in colour), and the sampled masks."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt
    import numpy as np

    L = int(search["num_hidden_layers"])
    keep = set(search["keep"])
    theta = np.array([row["theta"] for row in trajectory]) if trajectory else np.zeros((1, L))
    masks = np.zeros((len(trajectory) or 1, L))
    for i, row in enumerate(trajectory):
        masks[i, row["keep"]] = 1.0
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for layer in range(L):
        ax1.plot(
            theta[:, layer],
            lw=1.2 if layer in keep else 0.8,
            color=None if layer in keep else "0.6",
            ls="-" if layer in keep else "--",
        )
    ax1.set(xlabel="search step", ylabel="keep-logit θ", title="θ per layer (dashed: removed)")
    ax2.imshow(masks.T, aspect="auto", interpolation="nearest", cmap="Greys", origin="lower")
    ax2.set(xlabel="search step", ylabel="layer", title="sampled hard masks (black: kept)")
    fig.suptitle(f"keep {len(keep)} of {L}: removed {search['removed']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def html_image(png: bytes, title: str) -> str:
    """A self-contained HTML page (the Kubeflow UI renders HTML artifacts; no external files)."""
    data = base64.b64encode(png).decode()
    return f'<html><body><h3>{title}</h3><img alt="{title}" src="data:image/png;base64,{data}"/></body></html>\n'


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def run_summary(
    flat: Mapping[str, float], keep: list[int], num_layers: int, model_uri: str, registration: Mapping[str, Any] | None
) -> str:
    """The Markdown a person wants at the end of a run."""
    lines = [
        "## e3-pruner run",
        "",
        f"- **Layers kept:** {len(keep)} of {num_layers}: `{keep}`",
        f"- **Removed:** `{[i for i in range(num_layers) if i not in set(keep)]}`",
        "",
        "| model | layers | perplexity (eval split) | ratio to teacher |",
        "|---|---|---|---|",
    ]
    for role, label in (("teacher", "teacher"), ("pruned", "pruned (no training)"), ("student", "distilled")):
        if f"{role}.perplexity" in flat:
            ratio = 1.0 if role == "teacher" else flat.get(f"{role}.perplexity_ratio")
            lines.append(
                f"| {label} | {int(flat.get(f'{role}.layers', 0))} | {flat[f'{role}.perplexity']:.2f} | "
                f"{_fmt(ratio, '.3f')} |"
            )
    lines.append("")
    if "speedup.prefill" in flat:
        lines.append(
            f"- **Speedup over the teacher:** prefill {flat['speedup.prefill']:.2f}×, "
            f"decode {_fmt(flat.get('speedup.decode'), '.2f')}×"
        )
    if flat.get("student.gap_closed") is not None:
        lines.append(f"- **Perplexity gap closed by distillation:** {flat['student.gap_closed']:.1%}")
    lines.append(f"- **Model:** `{model_uri}`")
    if registration:
        lines.append(
            f"- **MLflow:** model `{registration.get('model_name')}` version {registration.get('version')} "
            f"(alias `{registration.get('alias')}`), run `{registration.get('run_id')}` at "
            f"{registration.get('tracking_uri')}"
        )
    return "\n".join(lines) + "\n"
