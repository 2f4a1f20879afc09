"""Linear correction benchmark (docs/method.md, "Linear correction (beyond the paper)").

On the shipped reference model, for each keep-set (E³ and SLEB at 25 % and 40 % removed, as
`benchmarks/results/selection.json` records them: chosen on the same search split as here, since
the eval and search splits do not move when the distill budget changes), the model is hardened
without and with the linear correction (fitted on the teacher cache's *search* split only), then
distilled with the step's defaults (plain top-K KD) on one pass over the distill split. Reported on
the *eval* split: held-out perplexity, KL to the teacher (full vocabulary) and top-1 agreement,
before and after distillation. Extra rows (no distillation) compare the two ways of taking the
fit's inputs (``pruned``: the default; ``full``: ReplaceMe's one pass over the full model).

    OMP_NUM_THREADS=1 python benchmarks/linear_correction.py [--methods e3,sleb] [--ratios 0.25,0.4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.distill import DistillConfig, distill
from e3prune.evaluate import EvaluateConfig, evaluate
from e3prune.harden import HardenConfig, harden_checkpoint
from e3prune.reference import MODEL_DIR
from e3prune.teacher import TeacherLogitsConfig, teacher_logits

HERE = Path(__file__).resolve().parent
WORK = HERE / ".cache" / "linear-correction"
METHOD_ROWS = {"e3": "e3 (Gumbel-TopK search)", "sleb": "sleb"}
SPLIT_TOKENS = {"search": 65536, "eval": 65536, "distill": 131072}


def prepare() -> tuple[Path, Path]:
    data, cache = WORK / "data", WORK / "teacher"
    if not (data / "manifest.json").is_file():
        sample_data(
            SampleConfig(
                sources=[SourceSpec(uri="builtin:reference")],
                search_tokens=SPLIT_TOKENS["search"],
                eval_tokens=SPLIT_TOKENS["eval"],
                distill_tokens=SPLIT_TOKENS["distill"],
                output=str(data),
            )
        )
    if not (cache / "manifest.json").is_file():
        teacher_logits(TeacherLogitsConfig(data=str(data), output=str(cache), splits=["search", "distill"]))
    return data, cache


def keep_sets(methods: list[str], ratios: list[float]) -> list[tuple[str, float, list[int]]]:
    rows = json.loads((HERE / "results" / "selection.json").read_text())["rows"]
    out = []
    for method in methods:
        for ratio in ratios:
            (row,) = [r for r in rows if r["method"] == METHOD_ROWS[method] and abs(r["ratio"] - ratio) < 1e-9]
            out.append((method, ratio, row["removed"]))
    return out


def harden_one(out: Path, removed: list[int], cache: Path, correction: str | None) -> tuple[dict, float]:
    t0 = time.time()
    extra = {}
    if correction:
        extra = dict(linear_correction=True, calibration_data=str(cache), linear_correction_inputs=correction)
    if not (out / "pruning.json").is_file():
        harden_checkpoint(HardenConfig(model=str(MODEL_DIR), output=str(out), remove_layers=removed, **extra))
    return json.loads((out / "pruning.json").read_text()), time.time() - t0


def scores(m: dict, who: str) -> dict:
    return {
        "ppl": m["models"][who]["perplexity"],
        "kl": m["comparisons"][who]["kl"],
        "top1": m["comparisons"][who]["top1_agreement"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="e3,sleb")
    ap.add_argument("--ratios", default="0.25,0.4")
    ap.add_argument("--distill-tokens", type=int, default=SPLIT_TOKENS["distill"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    data, cache = prepare()
    rows, teacher_ppl = [], None
    for method, ratio, removed in keep_sets(args.methods.split(","), [float(r) for r in args.ratios.split(",")]):
        for correction in (None, "pruned"):
            tag = f"{method}-{int(ratio * 100)}-{correction or 'plain'}"
            pruned, student = WORK / f"pruned-{tag}", WORK / f"student-{tag}"
            pruning, harden_s = harden_one(pruned, removed, cache, correction)
            t0 = time.time()
            distill(
                DistillConfig(
                    student=str(pruned),
                    teacher_cache=str(cache),
                    output=str(student),
                    distill_tokens=args.distill_tokens,
                    allow_repeat=args.distill_tokens > SPLIT_TOKENS["distill"],
                    overwrite=True,
                )
            )
            distill_s = time.time() - t0
            m = evaluate(
                EvaluateConfig(
                    pruned=str(pruned),
                    student=str(student),
                    data=str(data),
                    speed=False,
                    output=str(WORK / f"eval-{tag}"),
                    overwrite=True,
                )
            )
            teacher_ppl = m["models"]["teacher"]["perplexity"]
            lc = pruning.get("linear_correction")
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "removed": removed,
                    "correction": correction,
                    "before": scores(m, "pruned"),
                    "after": scores(m, "student"),
                    "harden_s": harden_s,
                    "distill_s": distill_s,
                    "runs": lc["runs"] if lc else None,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    # Ablation, before distillation only: the fit's inputs from the full model (ReplaceMe's one pass).
    ablation = []
    for method, ratio, removed in keep_sets(["e3"], [float(r) for r in args.ratios.split(",")]):
        tag = f"{method}-{int(ratio * 100)}-full"
        pruned = WORK / f"pruned-{tag}"
        pruning, harden_s = harden_one(pruned, removed, cache, "full")
        m = evaluate(
            EvaluateConfig(
                pruned=str(pruned), data=str(data), speed=False, output=str(WORK / f"eval-{tag}"), overwrite=True
            )
        )
        ablation.append(
            {
                "method": method,
                "ratio": ratio,
                "before": scores(m, "pruned"),
                "runs": pruning["linear_correction"]["runs"],
            }
        )
        print(json.dumps(ablation[-1]), flush=True)
    write(rows, ablation, teacher_ppl, args, time.time() - started)


def _fmt(s: dict) -> str:
    return f"{s['ppl']:.2f} | {s['kl']:.4f} | {s['top1']:.4f}"


def write(rows: list[dict], ablation: list[dict], teacher_ppl: float, args, seconds: float) -> None:
    lines = [
        "# Linear correction (beyond the paper): before and after distillation",
        "",
        f"Reference model (24 layers), teacher held-out perplexity **{teacher_ppl:.2f}**. Keep-sets from "
        "`benchmarks/results/selection.json` (E³ search and SLEB, chosen on this same search split). Correction: "
        "one least-squares map per removed run, ridge 1e-4 towards the identity, fitted on the whole search split "
        f"({SPLIT_TOKENS['search']:,} tokens; never the eval split), inputs from the pruned model (`pruned`). "
        f"Distillation: `DistillConfig` defaults (plain top-K KD, AdamW lr 3e-4, batch 8 × 256, seed 0) on "
        f"{args.distill_tokens:,} tokens = one pass over the {SPLIT_TOKENS['distill']:,}-token distill split "
        f"(allow_repeat {'on' if args.distill_tokens > SPLIT_TOKENS['distill'] else 'off: not needed'}). "
        f"Scored on the eval split ({SPLIT_TOKENS['eval']:,} tokens): perplexity, KL(teacher ‖ model) over the full "
        "vocabulary, top-1 agreement with the teacher.",
        f"Machine: {platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores shared, "
        f"{torch.get_num_threads()} thread, torch {torch.__version__}.",
        "",
        "| selector | removed | correction | ppl before | KL before | top-1 before | ppl after KD | KL after KD | "
        "top-1 after KD | harden s | distill s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {int(r['ratio'] * 100)} % {r['removed']} | {'on' if r['correction'] else 'off'} | "
            f"{_fmt(r['before'])} | {_fmt(r['after'])} | {r['harden_s']:.0f} | {r['distill_s']:.0f} |"
        )
    lines += [
        "",
        "Fit per removed run (relative residual ‖Y + M T − L‖ / ‖L‖ on the search split, before → after):",
        "",
    ]
    for r in rows:
        if r["runs"]:
            fits = ", ".join(
                f"{x['removed']}→{x['folded_into']}: {x['relative_residual_before']:.3f} → {x['relative_residual_after']:.3f}"
                if x["skipped"] is None
                else f"{x['removed']}: skipped (at the start)"
                for x in r["runs"]
            )
            lines.append(f"- {r['method']} {int(r['ratio'] * 100)} %: {fits}")
    lines += [
        "",
        "Ablation, before distillation: the fit's inputs Y_i, M_i from the full model (`full`, ReplaceMe's single "
        "pass) instead of the pruned model with the earlier maps in place (`pruned`).",
        "",
        "| selector | removed | inputs | ppl | KL | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for a in ablation:
        (p,) = [r for r in rows if r["method"] == a["method"] and r["ratio"] == a["ratio"] and r["correction"]]
        lines.append(f"| {a['method']} | {int(a['ratio'] * 100)} % | pruned | {_fmt(p['before'])} |")
        lines.append(f"| {a['method']} | {int(a['ratio'] * 100)} % | full | {_fmt(a['before'])} |")
    lines += [
        "",
        f"Total {seconds:.0f} s. Command: `OMP_NUM_THREADS=1 python benchmarks/linear_correction.py "
        f"--methods {args.methods} --ratios {args.ratios}`",
        "",
    ]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "linear-correction.md").write_text("\n".join(lines))
    (HERE / "results" / "linear-correction.json").write_text(
        json.dumps({"args": vars(args), "teacher_ppl": teacher_ppl, "rows": rows, "ablation": ablation}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
