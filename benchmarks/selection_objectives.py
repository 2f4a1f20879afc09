"""Score the 40 % removal sets of SLEB and E³ by both search-split objectives (cross-entropy, as
SLEB ranks, and KL to the teacher's top-10, as E³ optimises) next to their held-out perplexity.

Reuses the sampled data and teacher cache of ``benchmarks/selection.py`` (run it first). Writes
``benchmarks/results/selection-objectives.md``.

    python benchmarks/selection_objectives.py
"""

from __future__ import annotations

import math
import platform
import sys
import tempfile
from pathlib import Path

import torch

from e3prune.data import load_split
from e3prune.model_io import load_causal_lm
from e3prune.reference import MODEL_DIR
from e3prune.search import SearchConfig, search_mask
from e3prune.selection import Calibration, masked_loss
from e3prune.teacher import TeacherTopK

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import selection as bench  # noqa: E402  (the benchmark's held-out perplexity and cache location)

RATIO = 0.4
SLEB = [2, 3, 4, 7, 8, 10, 11, 12, 19, 21]  # benchmarks/results/selection.md, 40 %


def main() -> None:
    torch.set_num_threads(2)
    work = bench.CACHE / "selection-model"
    model = load_causal_lm(MODEL_DIR, "float32")
    L = model.config.num_hidden_layers
    full = Calibration.from_batch(TeacherTopK(str(work / "teacher")).load("search"))
    eval_ids = load_split(str(work / "data"), "eval")
    sets = {"SLEB": SLEB}
    for label, ce_weight in (("E³ (λ = 0, the default)", 0.0), ("E³ with the CE term, λ = 1", 1.0)):
        with tempfile.TemporaryDirectory() as tmp:
            res = search_mask(
                SearchConfig(
                    model=str(MODEL_DIR),
                    teacher_cache=str(work / "teacher"),
                    output=f"{tmp}/search",
                    selection_method="e3",
                    remove_ratio=RATIO,
                    ce_weight=ce_weight,
                    seed=0,
                )
            )
        sets[label] = res["removed"]
    lines = [
        "# 40 % removal sets scored by both search-split objectives",
        "",
        f"Reference model, 40 % removed, seed 0; search split and eval split of `benchmarks/selection.py`. "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| set | removed | search-split perplexity (CE) | search-split KL | held-out perplexity |",
        "|---|---|---|---|---|",
    ]
    for label, removed in sets.items():
        keep = [i for i in range(L) if i not in removed]
        ce = masked_loss(model, full, keep, "ce", 16)
        kl = masked_loss(model, full, keep, "kl", 16)
        ppl = bench.heldout_ppl(model, eval_ids, keep)
        lines.append(f"| {label} | {removed} | {math.exp(ce):.2f} | {kl:.4f} | {ppl:.2f} |")
    lines += ["", "Command: `python benchmarks/selection_objectives.py`", ""]
    (HERE / "results" / "selection-objectives.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
