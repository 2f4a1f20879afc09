"""Speed of a hardened model: prefill and decode tokens/s of
(a) the original reference model, (b) the model hardened with 25 % of its layers removed, and
(c) a model of the same class built natively with the hardened depth (random weights: speed
does not depend on the values). Hardening must add no overhead: (b) within 3 % of (c), and (b)'s
speedup over (a) at least 95 % of the ideal for that depth.

The ideal speedup for depth k is what a model built natively at that depth achieves over the
original: only the decoder layers go, while the embedding, final norm, LM head and the
generation loop stay, so it is below L/k. Both L/k and the share of time outside the layers
(from t(depth) = t_rest + depth · t_layer, fitted on the two depths) are reported beside it.

Runs interleave the models (a, b, c, a, b, c, ...) so that drifts of a shared machine hit all
alike; the table reports medians, the JSON beside it also each model's min / max. The timing is
the evaluate step's (``e3prune.speed``), synchronised on CUDA. Usage:

    python benchmarks/speed.py [--repeats 7] [--threads 2] [--out benchmarks/results/speed.md]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from e3prune.harden import harden
from e3prune.reference import MODEL_DIR
from e3prune.speed import PHASES, SpeedSettings, measure_speed


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--remove-ratio", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--decode-prompt", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/speed.md")
    return ap.parse_args()


def build_models(model_dir: str, remove_ratio: float) -> dict[str, torch.nn.Module]:
    """original, hardened (the first layers kept) and native (same class built at that depth)."""
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    L = original.config.num_hidden_layers
    keep = list(range(L - round(remove_ratio * L)))  # which layers does not matter for speed
    hardened = harden(original, keep).eval()
    native = AutoModelForCausalLM.from_config(hardened.config).eval()  # random weights, built at depth k
    return {"original": original, "hardened": hardened, "native": native}


def phase_results(med: dict[str, dict[str, float]], tokens: dict[str, int], L: int, k: int) -> dict[str, dict]:
    """Per phase: tokens/s of each model, hardened vs native, the speedup and its ideal."""
    phases = {}
    for phase in PHASES:
        t_a, t_b, t_c = med["original"][phase], med["hardened"][phase], med["native"][phase]
        ideal = t_a / t_c  # the natively built model of depth k is the ideal for that depth
        speedup = t_a / t_b
        t_layer = (t_a - t_c) / (L - k)  # t(depth) = t_rest + depth * t_layer
        t_rest = max(0.0, t_a - L * t_layer)
        phases[phase] = {
            "tokens_per_s": {n: tokens[phase] / med[n][phase] for n in med},
            "hardened_vs_native": t_b / t_c - 1,
            "speedup": speedup,
            "ideal_speedup": ideal,
            "layers_only_speedup": L / k,
            "speedup_of_ideal": speedup / ideal,
            "share_outside_layers": t_rest / t_a,
        }
    return phases


def table_row(phase: str, r: dict, L: int, k: int) -> str:
    tps = r["tokens_per_s"]
    return (
        f"| {phase} | {tps['original']:,.0f} | {tps['hardened']:,.0f} | {tps['native']:,.0f} | "
        f"{100 * r['hardened_vs_native']:+.1f} % | {r['speedup']:.3f}× | {r['ideal_speedup']:.3f}× "
        f"(L/k = {L / k:.3f}) | {100 * r['speedup_of_ideal']:.1f} % |"
    )


def report(args: argparse.Namespace, phases: dict[str, dict], L: int, k: int) -> str:
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    return "\n".join(
        [
            "# Speed of a hardened model",
            "",
            f"Reference model ({L} layers) with {L - k} layers removed ({k} kept), fp32, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, {machine}; "
            f"median of {args.repeats} interleaved runs.",
            f"Prefill: batch {args.prefill_batch} × {args.prefill_len} tokens, no cache. Decode: batch "
            f"{args.decode_batch}, prompt {args.decode_prompt}, {args.decode_tokens} greedy tokens with the KV cache "
            "(prompt prefill subtracted).",
            "",
            "| phase | original tok/s | hardened tok/s | native tok/s | hardened vs native time | speedup | "
            "ideal speedup | speedup / ideal |",
            "|---|---|---|---|---|---|---|---|",
            *(table_row(phase, r, L, k) for phase, r in phases.items()),
            "",
            "Ideal speedup: that of the natively built model of the same depth; time outside the decoder layers",
            "(embedding, LM head, generation loop) does not shrink, so it is below L/k. Share of time outside the layers,",
            "fitted as t(depth) = t_rest + depth · t_layer: "
            + ", ".join(f"{p} {100 * r['share_outside_layers']:.0f} %" for p, r in phases.items())
            + ".",
            "Targets: hardened within 3 % of native; speedup ≥ 95 % of ideal.",
            "",
            f"Command: `python benchmarks/speed.py --repeats {args.repeats} --threads {args.threads}`",
            "",
        ]
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build_models(args.model, args.remove_ratio)
    L, k = (models[n].config.num_hidden_layers for n in ("original", "hardened"))
    settings = SpeedSettings(
        repeats=args.repeats,
        prefill_batch=args.prefill_batch,
        prefill_len=args.prefill_len,
        decode_batch=args.decode_batch,
        decode_prompt=args.decode_prompt,
        decode_tokens=args.decode_tokens,
    )
    timed = measure_speed(models, settings, pad_token_id=0)["models"]  # interleaved; medians and min / max
    med = {n: {p: timed[n][f"{p}_seconds"] for p in PHASES} for n in models}
    spread = {n: {p: [timed[n][f"{p}_seconds_min"], timed[n][f"{p}_seconds_max"]] for p in PHASES} for n in models}
    tokens = {"prefill": args.prefill_batch * args.prefill_len, "decode": args.decode_batch * args.decode_tokens}
    result = {"layers": {"original": L, "hardened": k}, "phases": phase_results(med, tokens, L, k)}
    text = report(args, result["phases"], L, k)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    record = {"args": vars(args), "median_seconds": med, "min_max_seconds": spread, **result}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(text)


if __name__ == "__main__":
    main()
