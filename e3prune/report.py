"""What a person reads about a run: flat metric names, the search plot, the evaluation's
``summary.md`` and the final summary.

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

# The speed measurement's reliability in the registry (docs/method.md, Stage 6): a metric the gate
# reads (1.0 trusted, 0.0 not), and a version tag with the reason when it is not trusted.
SPEED_RELIABLE_METRIC = "speedup.reliable"
SPEED_REASON_TAG = "e3prune.speed.unreliable_reason"


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics.json`` of the evaluate step as ``{dotted.name: number}``.

    Names: ``<role>.perplexity`` / ``.loss`` / ``.layers`` / ``.parameters`` for teacher, pruned
    and student; ``<role>.top1_agreement`` / ``.kl`` / ``.perplexity_ratio`` / ``.gap_closed`` for
    the compared roles; ``speedup.prefill`` / ``speedup.decode`` (student, else pruned, over the
    teacher), ``speedup.reliable`` (1.0 or 0.0: whether the evaluate step trusted the timing) and
    ``<role>.prefill_relative_spread`` / ``.decode_relative_spread`` ((max − min) / median of the
    repeats); ``lm_eval.<task>.<role>.<metric>``.
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
    for role, phases in (speed.get("relative_spread") or {}).items():
        for phase, value in phases.items():
            put(f"{role}.{phase}_relative_spread", value)
    if isinstance(speed.get("reliable"), bool):  # absent from a metrics.json written before it was recorded
        put(SPEED_RELIABLE_METRIC, 1.0 if speed["reliable"] else 0.0)
    for task, roles in (metrics.get("lm_eval") or {}).items():
        for role, values in roles.items():
            for name, value in (values or {}).items():
                if name != "samples":
                    put(f"lm_eval.{task}.{role}.{name}", value)
    return out


def speed_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Version tags about the speed measurement: the reason it is not trusted, when it is not."""
    speed = metrics.get("speed") or {}
    if speed.get("reliable") is False:
        return {SPEED_REASON_TAG: str(speed.get("unreliable_reason") or "no reason recorded")[:4000]}
    return {}


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


# --------------------------------------------------------------------------- the evaluation summary


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def summary_markdown(metrics: Mapping[str, Any]) -> str:
    """``summary.md`` of the evaluate step, from its ``metrics.json``: one row per model, then the
    recovered share of the perplexity gap, the speedup and what lm-eval scored."""
    data = metrics["data"]
    lines = [
        "# Evaluation: teacher, pruned and distilled models",
        "",
        f"Held-out data: {data['sequences']:,} sequences × {data['seq_len']} tokens of the eval split of "
        f"`{data['uri']}` ({data['scored_tokens']:,} next-token positions). Top-1 agreement and KL are "
        "against the teacher, over the full vocabulary.",
        "",
        *_model_table(metrics),
        "",
        _gap_line(metrics["models"], metrics["comparisons"]),
        *_speed_lines(metrics["speed"]),
    ]
    if metrics["lm_eval"]:
        lines.append(_lm_eval_line(metrics["lm_eval"], metrics["config"].get("lm_eval_limit")))
    return "\n".join(lines) + "\n"


def _lm_eval_columns(lm_eval: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval score, stderrs and sample counts left out."""
    return [
        (task, name)
        for task, by_role in lm_eval.items()
        for name in sorted({k for scores in by_role.values() for k in scores})
        if name != "samples" and not name.endswith("_stderr") and "_stderr," not in name
    ]


def _model_table(metrics: Mapping[str, Any]) -> list[str]:
    """The Markdown table: a header, then one row per model given (teacher, pruned, student)."""
    comparisons, speed, lm_eval = metrics["comparisons"], metrics["speed"], metrics["lm_eval"]
    lm_columns = _lm_eval_columns(lm_eval)
    header = ["model", "layers", "parameters", "held-out ppl", "ppl ratio", "top-1 agreement", "KL (nats/token)"]
    header += ["prefill tok/s", "decode tok/s", *(f"{task} {name}" for task, name in lm_columns)]
    rows = []
    for role, m in metrics["models"].items():
        if m is None:
            continue
        c = comparisons.get(role) or {}
        s = (speed or {}).get("models", {}).get(role, {})
        scores = [lm_eval[task].get(role, {}).get(name) for task, name in lm_columns]
        rows.append(
            [
                role,
                str(m["layers"]),
                _count(m["parameters"]["total"]),
                f"{m['perplexity']:.3f}",
                "1.000" if role == "teacher" else _num(c.get("perplexity_ratio"), ".3f"),
                _num(c.get("top1_agreement"), ".3f"),
                _num(c.get("kl"), ".4f"),
                _num(s.get("prefill_tokens_per_second"), ",.0f"),
                _num(s.get("decode_tokens_per_second"), ",.0f"),
                *(_num(v, ".3f") for v in scores),
            ]
        )
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _gap_line(models: Mapping[str, Any], comparisons: Mapping[str, Any]) -> str:
    student = comparisons.get("student")
    if models.get("student") is None:
        return "No student was given, so no recovered share of the perplexity gap is reported."
    if models.get("pruned") is None:
        return "No pruned model was given, so the student's share of the recovered perplexity gap is not defined."
    ppl = {r: m["perplexity"] for r, m in models.items() if m is not None}
    if student["gap_closed"] is None:
        return f"The pruned model's perplexity equals the teacher's ({ppl['teacher']:.3f}): there is no gap to close."
    return (
        f"The student closes {100 * student['gap_closed']:.1f} % of the pruned-vs-teacher perplexity gap "
        f"(pruned {ppl['pruned']:.3f} → student {ppl['student']:.3f}; teacher {ppl['teacher']:.3f})."
    )


def _speed_lines(speed: Mapping[str, Any] | None) -> list[str]:
    """One sentence per timed model: its speedup over the teacher and how it was measured; then,
    when the measurement is not trusted, why."""
    if speed is None:
        return []
    again = " (after measuring a second time)" if speed.get("remeasured") else ""
    lines = [
        f"The {role} runs {up['prefill']:.2f}× the teacher's prefill and {up['decode']:.2f}× its decode "
        f"throughput ({speed['device']}, {speed['dtype']}, median of {speed['repeats']} interleaved runs{again}; "
        f"prefill {speed['prefill']['batch']} × {speed['prefill']['length']} tokens without cache, decode "
        f"{speed['decode']['batch']} × {speed['decode']['new_tokens']} greedy tokens with the KV cache after "
        f"a {speed['decode']['prompt']}-token prompt)."
        for role, up in speed["speedup"].items()
    ]
    if speed.get("reliable") is False:
        lines.append(f"**Speed unreliable** (the promotion gate refuses it): {speed.get('unreliable_reason')}.")
    return lines


def _lm_eval_line(lm_eval: Mapping[str, Any], limit: int | None) -> str:
    """Which tasks lm-eval ran, on how many items each."""
    samples = {
        task: next((s.get("samples") for s in by_role.values() if s.get("samples") is not None), None)
        for task, by_role in lm_eval.items()
    }
    return (
        "lm-eval: "
        + ", ".join(f"{task} on {n} items" if n is not None else task for task, n in samples.items())
        + (f" (limited to {limit} per task)" if limit else "")
        + "."
    )
