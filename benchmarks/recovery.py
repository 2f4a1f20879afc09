"""Recovery benchmark: which distillation loss recovers the pruned model best (docs/method.md, Stage 5).

On the shipped reference model with the E³ mask at 25 % removal (default search), the hardened
student is trained at two equal token budgets with each loss:
- ``ce``: next-token cross-entropy only (plain fine-tuning);
- ``kd``: plain top-K KD (γ = 0, λ = 0);
- ``entropy_kd``: the entropy-aware loss with the default γ, ε, λ.
Reported: held-out perplexity on the eval split, top-1 agreement and KL to the teacher (full
vocabulary), the share of the pruned-vs-teacher perplexity gap that was closed, and wall time.
Everything else (data, lr schedule, batch, seed) is the step's default and the same for all.

Memory: the peak RSS of a distillation run (entropy-aware loss, teacher cache read) against plain
CE fine-tuning of the same student at the same batch, each in a fresh process
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper that runs only that one).

    python benchmarks/recovery.py [--budgets 131072,524288]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.distill import DistillConfig, distill
from e3prune.evaluate import EvaluateConfig, evaluate
from e3prune.harden import HardenConfig, harden_checkpoint
from e3prune.reference import MODEL_DIR
from e3prune.search import SearchConfig, search_mask
from e3prune.teacher import TeacherLogitsConfig, teacher_logits

HERE = Path(__file__).resolve().parent
WORK = HERE / ".cache" / "recovery"
LOSSES = ("ce", "kd", "entropy_kd")


def prepare(args) -> tuple[Path, Path, Path, dict]:
    data, cache, search, pruned = WORK / "data", WORK / "teacher", WORK / "search", WORK / "pruned"
    if not (data / "manifest.json").is_file():
        sample_data(
            SampleConfig(
                sources=[SourceSpec(uri="builtin:reference")],
                search_tokens=65536,
                eval_tokens=65536,
                distill_tokens=args.distill_split_tokens,
                output=str(data),
            )
        )
    if not (cache / "manifest.json").is_file():
        teacher_logits(TeacherLogitsConfig(data=str(data), output=str(cache), splits=["search", "distill"]))
    if not (search / "search.json").is_file():
        search_mask(
            SearchConfig(teacher_cache=str(cache), output=str(search), remove_ratio=0.25, selection_method="e3")
        )
    found = json.loads((search / "search.json").read_text())
    if not (pruned / "pruning.json").is_file():
        harden_checkpoint(
            HardenConfig(model=str(MODEL_DIR), output=str(pruned), keep_layers=found["keep"], method="e3_gumbel_topk")
        )
    return data, cache, pruned, found


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak RSS of ``cmd`` alone: a fresh wrapper process reports the max over its only child."""
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="131072,524288", help="distillation token budgets, comma-separated")
    ap.add_argument("--distill-split-tokens", type=int, default=131072)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    started = time.time()
    data, cache, pruned, found = prepare(args)

    base = evaluate(
        EvaluateConfig(
            pruned=str(pruned), data=str(data), speed=False, output=str(WORK / "eval-pruned"), overwrite=True
        )
    )
    t_ppl = base["models"]["teacher"]["perplexity"]
    p_ppl = base["models"]["pruned"]["perplexity"]
    rows = []
    for budget in budgets:
        for loss in LOSSES:
            out = WORK / f"student-{loss}-{budget}"
            t0 = time.time()
            summary = distill(
                DistillConfig(
                    student=str(pruned),
                    teacher_cache=str(cache),
                    output=str(out),
                    loss=loss,
                    distill_tokens=budget,
                    allow_repeat=True,
                    overwrite=True,
                )
            )
            seconds = time.time() - t0
            m = evaluate(
                EvaluateConfig(
                    student=str(out),
                    data=str(data),
                    speed=False,
                    output=str(WORK / f"eval-{loss}-{budget}"),
                    overwrite=True,
                )
            )
            s, c = m["models"]["student"], m["comparisons"]["student"]
            rows.append(
                {
                    "budget": budget,
                    "loss": loss,
                    "ppl": s["perplexity"],
                    "top1_agreement": c["top1_agreement"],
                    "kl": c["kl"],
                    "gap_closed": (p_ppl - s["perplexity"]) / (p_ppl - t_ppl),
                    "seconds": seconds,
                    "steps": summary.get("steps"),
                }
            )
            print(rows[-1], flush=True)

    # Peak memory: entropy-aware distillation vs plain CE fine-tuning, same student and batch.
    rss = {}
    for loss in ("entropy_kd", "ce"):
        cmd = [
            sys.executable,
            "-m",
            "e3prune.cli",
            "distill",
            "--student",
            str(pruned),
            "--teacher-cache",
            str(cache),
            "--output",
            str(WORK / f"rss-{loss}"),
            "--loss",
            loss,
            "--distill-tokens",
            "32768",
            "--overwrite",
        ]
        rss[loss] = peak_rss_mib(cmd)

    lines = [
        "# Recovery: distillation losses on the reference model",
        "",
        f"Reference model (24 layers) with the E³ mask at 25 % (removed {found['removed']}); teacher held-out "
        f"perplexity **{t_ppl:.2f}**, pruned (no distillation) **{p_ppl:.2f}**. Eval split 65,536 tokens; distill split "
        f"{args.distill_split_tokens:,} tokens (budgets above it repeat it). Defaults of `DistillConfig` otherwise "
        f"(AdamW lr 3e-4, warmup 5 %, cosine, batch 8 × 256, seed 0); entropy_kd uses γ = 1, ε = 0.1, λ = 1.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| budget (tokens) | loss | held-out ppl | gap closed | top-1 agreement | KL to teacher | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget in budgets:
        group = [r for r in rows if r["budget"] == budget]
        best_ppl = min(r["ppl"] for r in group)
        best_agree = max(r["top1_agreement"] for r in group)
        for r in group:
            ppl = f"**{r['ppl']:.2f}**" if r["ppl"] == best_ppl else f"{r['ppl']:.2f}"
            agree = (
                f"**{r['top1_agreement']:.4f}**" if r["top1_agreement"] == best_agree else f"{r['top1_agreement']:.4f}"
            )
            lines.append(
                f"| {budget:,} | {r['loss']} | {ppl} | {100 * r['gap_closed']:.1f} % | {agree} | {r['kl']:.4f} | "
                f"{r['seconds']:.0f} |"
            )
    lines += [
        "",
        f"Peak RSS, same student and batch: entropy-aware distillation {rss['entropy_kd']:.0f} MiB, plain CE "
        f"fine-tuning {rss['ce']:.0f} MiB: **{100 * (rss['entropy_kd'] / rss['ce'] - 1):+.1f} %** (target within 15 %; "
        "the teacher is never loaded, only its cached top-K is read).",
        "",
        f"Total {time.time() - started:.0f} s. Command: `python benchmarks/recovery.py --budgets {args.budgets}`",
        "",
    ]
    text = "\n".join(lines)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "recovery.md").write_text(text)
    (HERE / "results" / "recovery.json").write_text(
        json.dumps(
            {"args": vars(args), "teacher_ppl": t_ppl, "pruned_ppl": p_ppl, "rows": rows, "peak_rss_mib": rss}, indent=1
        )
    )
    print(text)


if __name__ == "__main__":
    main()
