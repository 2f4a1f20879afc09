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
alike; the table reports medians. Usage:

    python benchmarks/speed.py [--repeats 7] [--threads 2] [--out benchmarks/results/speed.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from e3prune.harden import harden
from e3prune.reference import MODEL_DIR


def prefill_seconds(model, batch: torch.Tensor) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        return time.perf_counter() - t


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Time of ``new_tokens`` greedy steps with the KV cache, prefill of the prompt excluded."""
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(prompt, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=new_tokens + 1,
            min_new_tokens=new_tokens + 1,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - t - t_first


def main() -> None:
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    original = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    L = original.config.num_hidden_layers
    n_remove = round(args.remove_ratio * L)
    keep = list(range(L - n_remove))  # which layers does not matter for speed
    hardened = harden(original, keep).eval()
    native = AutoModelForCausalLM.from_config(hardened.config).eval()  # same class, built at depth k
    models = {"original": original, "hardened": hardened, "native": native}

    vocab = original.config.vocab_size
    prefill_batch = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len))
    prompt = torch.randint(0, vocab, (args.decode_batch, args.decode_prompt))
    for m in models.values():  # warm-up
        prefill_seconds(m, prefill_batch[:2])
        decode_seconds(m, prompt, 4)
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            times[name]["prefill"].append(prefill_seconds(m, prefill_batch))
            times[name]["decode"].append(decode_seconds(m, prompt, args.decode_tokens))

    prefill_tokens = prefill_batch.numel()
    decode_tokens = args.decode_batch * args.decode_tokens
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    k = L - n_remove
    rows = []
    result: dict = {"layers": {"original": L, "hardened": k}, "phases": {}}
    for phase, tokens in (("prefill", prefill_tokens), ("decode", decode_tokens)):
        t_a, t_b, t_c = med["original"][phase], med["hardened"][phase], med["native"][phase]
        ideal = t_a / t_c  # the natively built model of depth k is the ideal for that depth
        speedup = t_a / t_b
        t_layer = (t_a - t_c) / (L - k)  # t(depth) = t_rest + depth * t_layer
        t_rest = max(0.0, t_a - L * t_layer)
        phase_row = {
            "tokens_per_s": {n: tokens / med[n][phase] for n in models},
            "hardened_vs_native": t_b / t_c - 1,
            "speedup": speedup,
            "ideal_speedup": ideal,
            "layers_only_speedup": L / k,
            "speedup_of_ideal": speedup / ideal,
            "share_outside_layers": t_rest / t_a,
        }
        result["phases"][phase] = phase_row
        tps = phase_row["tokens_per_s"]
        rows.append(
            f"| {phase} | {tps['original']:,.0f} | {tps['hardened']:,.0f} | {tps['native']:,.0f} | "
            f"{100 * phase_row['hardened_vs_native']:+.1f} % | {speedup:.3f}× | {ideal:.3f}× (L/k = {L / k:.3f}) | "
            f"{100 * phase_row['speedup_of_ideal']:.1f} % |"
        )
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    text = "\n".join(
        [
            "# Speed of a hardened model",
            "",
            f"Reference model ({L} layers) with {n_remove} layers removed ({k} kept), fp32, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, {machine}; "
            f"median of {args.repeats} interleaved runs.",
            f"Prefill: batch {args.prefill_batch} × {args.prefill_len} tokens, no cache. Decode: batch "
            f"{args.decode_batch}, prompt {args.decode_prompt}, {args.decode_tokens} greedy tokens with the KV cache "
            "(prompt prefill subtracted).",
            "",
            "| phase | original tok/s | hardened tok/s | native tok/s | hardened vs native time | speedup | "
            "ideal speedup | speedup / ideal |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Ideal speedup: that of the natively built model of the same depth; time outside the decoder layers",
            "(embedding, LM head, generation loop) does not shrink, so it is below L/k. Share of time outside the layers,",
            "fitted as t(depth) = t_rest + depth · t_layer: "
            + ", ".join(f"{p} {100 * r['share_outside_layers']:.0f} %" for p, r in result["phases"].items())
            + ".",
            "Targets: hardened within 3 % of native; speedup ≥ 95 % of ideal.",
            "",
            f"Command: `python benchmarks/speed.py --repeats {args.repeats} --threads {args.threads}`",
            "",
        ]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "median_seconds": med, **result}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
