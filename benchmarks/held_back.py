"""How many held-back sequences separate the search's final candidates? (docs/method.md, "Final selection")

On the shipped reference model the E³ search runs at 25 % and 40 % on the training part of a
search split sampled from ``builtin:reference-train``; its final candidates are then scored,
sequence by sequence, on a pool of ``--pool`` held-back sequences the search never trained on
(the last of the split). For n sequences, many random pairs of *disjoint* n-subsets of the pool
each rank the candidates by mean top-10 KL, and the benchmark reports how well the two halves
agree: Kendall's τ of the two rankings, how often they pick the same candidate, and the regret
of the pick of one half judged on the rest of the pool (the pick's KL over the best candidate's,
in %). Only the search split is read; the eval split is not sampled.

    OMP_NUM_THREADS=1 python benchmarks/held_back.py          # writes results/held-back.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

import e3prune.search as search_module
from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.losses import topk_kl
from e3prune.masking import masked_view
from e3prune.placement import input_device
from e3prune.reference import MODEL_DIR
from e3prune.search import SearchConfig, search_mask
from e3prune.teacher import TeacherLogitsConfig, teacher_logits

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
SIZES = (8, 16, 32, 64, 128)


@torch.no_grad()
def per_sequence_kl(model, calib, keep, batch_size: int = 8) -> torch.Tensor:
    """Mean top-K KL per sequence (N,) of the masked view."""
    out, device = [], input_device(model)
    with masked_view(model, keep):
        for s in range(0, calib.input_ids.size(0), batch_size):
            x = calib.input_ids[s : s + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            sl = slice(s, s + batch_size)
            out.append(topk_kl(logits, calib.values[sl], calib.ids[sl], calib.lse[sl]).mean(dim=1))
    return torch.cat(out)


def kendall_tau(a: list[float], b: list[float]) -> float:
    n, concordant, discordant = len(a), 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            s = (a[i] - a[j]) * (b[i] - b[j])
            concordant += s > 0
            discordant += s < 0
    pairs = n * (n - 1) / 2
    return (concordant - discordant) / pairs


def agreement(kl: torch.Tensor, n: int, draws: int, rng: random.Random) -> dict:
    """kl: (candidates, pool). Disjoint n-subsets A and B; the pick of A judged on the rest of the pool."""
    pool = kl.size(1)
    taus, same, regret = [], 0, []
    for _ in range(draws):
        idx = list(range(pool))
        rng.shuffle(idx)
        a, b, rest = idx[:n], idx[n : 2 * n], idx[n:]
        ka, kb, kr = kl[:, a].mean(1), kl[:, b].mean(1), kl[:, rest].mean(1)
        taus.append(kendall_tau(ka.tolist(), kb.tolist()))
        same += int(ka.argmin() == kb.argmin())
        regret.append(float(kr[ka.argmin()] / kr.min() - 1) * 100)
    return {
        "n": n,
        "kendall_tau": sum(taus) / draws,
        "same_pick": same / draws,
        "regret_pct_mean": sum(regret) / draws,
        "regret_pct_p90": sorted(regret)[int(0.9 * draws)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search-tokens", type=int, default=204_800)
    ap.add_argument("--pool", type=int, default=256, help="held-back sequences scored per candidate")
    ap.add_argument("--ratios", default="0.25,0.4")
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seq_len = 256
    work = CACHE / f"held-back-s{args.search_tokens}-p{args.pool}"
    data, cache = work / "data", work / "teacher"
    started = time.time()
    if not (data / "manifest.json").is_file():
        sample_data(
            SampleConfig(
                sources=[SourceSpec(uri="builtin:reference-train")],
                search_tokens=args.search_tokens + args.pool * seq_len,
                distill_tokens=0,
                eval_tokens=0,
                output=str(data),
            )
        )
    if not (cache / "manifest.json").is_file():
        teacher_logits(TeacherLogitsConfig(model=str(MODEL_DIR), data=str(data), output=str(cache), splits=["search"]))

    scored: dict[tuple[int, ...], torch.Tensor] = {}
    real_masked_loss = search_module.masked_loss

    def recording_masked_loss(model, calib, keep, criterion="kl", batch_size=8, meter=None):
        kl = per_sequence_kl(model, calib, keep, batch_size)
        scored[tuple(keep)] = kl
        return float(kl.mean())

    rows, rng = [], random.Random(args.seed)
    search_module.masked_loss = recording_masked_loss
    try:
        for ratio in [float(r) for r in args.ratios.split(",")]:
            scored.clear()
            res = search_mask(
                SearchConfig(
                    teacher_cache=str(cache), output=str(work / f"search-{ratio}"), remove_ratio=ratio,
                    search_tokens=args.search_tokens, final_sequences=args.pool, seed=args.seed, overwrite=True,
                    selection_method="e3",
                )
            )  # fmt: skip
            assert res["held_back_sequences"] == args.pool
            kl = torch.stack([scored[tuple(c["keep"])] for c in res["candidates"]])
            means = kl.mean(1)
            for n in SIZES:
                r = {"ratio": ratio, "candidates": kl.size(0), **agreement(kl, n, args.draws, rng)}
                rows.append(r)
                print(r, flush=True)
            rows.append(
                {"ratio": ratio, "pool_kl": sorted(round(float(m), 5) for m in means), "chosen": res["removed"]}
            )
    finally:
        search_module.masked_loss = real_masked_loss
    record = {
        "args": vars(args),
        "rows": rows,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
    }
    (HERE / "results" / "held-back.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# Held-back sequences for the search's final selection",
        "",
        f"Reference model, search on {args.search_tokens:,} tokens of `builtin:reference-train` (seed {args.seed}, "
        f"defaults otherwise); every final candidate scored per sequence on {args.pool} held-back sequences of "
        f"{seq_len} tokens. For n sequences, {args.draws} random pairs of disjoint n-subsets of the pool rank "
        "the candidates by mean top-10 KL: Kendall's τ between the two rankings, how often both pick the same "
        "candidate, and the regret of one subset's pick on the rest of the pool (% KL over the best candidate).",
        "",
        "| removed | candidates | n | Kendall τ | same pick | regret mean % | regret p90 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "n" in r:
            lines.append(
                f"| {r['ratio']:.0%} | {r['candidates']} | {r['n']} | {r['kendall_tau']:.3f} | {r['same_pick']:.2f} | "
                f"{r['regret_pct_mean']:.2f} | {r['regret_pct_p90']:.2f} |"
            )
    lines += ["", "Candidates' KL on the whole pool (sorted):", ""]
    lines += [f"- {r['ratio']:.0%}: {r['pool_kl']}" for r in rows if "pool_kl" in r]
    lines += [
        "",
        f"{record['seconds'] / 60:.1f} min, 1 thread. Command: `OMP_NUM_THREADS=1 python benchmarks/held_back.py`",
        "",
    ]
    (HERE / "results" / "held-back.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
