"""Selection benchmark: which layers to remove, E³ search against every baseline.

On the shipped reference model (24 layers), removing 25 % and 40 % of the layers, it reports for
every selector the held-out perplexity of the pruned model (no distillation), its wall time, the
tokens it read and its compute in layer-tokens (a forward of T tokens through k computed layers
costs k·T; an activation-only backward counts like a forward).

Protocol. Data comes through the sample step as the pipeline samples it: a *search* split from the
model's training files (``builtin:reference-train``; what every selector may look at, and the only
split any hyperparameter was chosen on), sized like the pipeline's (the search budget plus the
128 held-back sequences), and a disjoint *eval* split from its held-out files (perplexity reported
here, never used for a choice). The teacher top-K cache covers the search split. Selectors that
need calibration data get the first ``--calibration-sequences`` sequences of the search split; the
E³ search reads its budget from the split's training part and scores its final candidates on the
held-back part, which is also where every row's "search-split KL" is measured.

With ``--validation``, the same on the validation model (``benchmarks/validation_model.py``), with
its own held-out and training files.

With ``--small``, the same on a 12-layer variant of the reference model (built on first use,
~15 min on 2 cores, cached under benchmarks/.cache) adds the exhaustive optimum over all C(12, n)
removal sets, scored by the same KL on the held-back part.

    python benchmarks/selection.py                 # 24 layers, 25 % and 40 %
    python benchmarks/selection.py --small         # 12 layers, with the exhaustive optimum
    python benchmarks/selection.py --validation    # the validation model (Llama, 20 layers)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from e3prune.data import SampleConfig, SourceSpec, load_split, sample_data
from e3prune.masking import masked_view
from e3prune.model_io import load_causal_lm
from e3prune.reference import MODEL_DIR
from e3prune.search import SearchConfig, search_mask
from e3prune.selection import SELECTORS, Calibration, masked_loss, n_remove_for
from e3prune.teacher import TeacherLogitsConfig, TeacherTopK, teacher_logits

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
sys.path.insert(0, str(HERE))  # end_to_end (the data sources of each model), validation_model


@torch.no_grad()
def heldout_ppl(model, eval_ids: torch.Tensor, keep: list[int], batch_size: int = 16) -> float:
    total, count = 0.0, 0
    with masked_view(model, keep):
        for s in range(0, eval_ids.size(0), batch_size):
            x = eval_ids[s : s + batch_size]
            logits = model(input_ids=x, use_cache=False).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


def small_model() -> Path:
    """The 12-layer variant: same recipe as the shipped model, half the depth."""
    from e3prune.reference.build import ReferenceModelConfig, build_reference_model

    path = CACHE / "reference-12L"
    if not (path / "model.safetensors").is_file():
        build_reference_model(ReferenceModelConfig(num_layers=12, threads=1), path)
    return path


def prepare(
    model_dir: Path, work: Path, search_tokens: int, eval_tokens: int, sources: list[dict]
) -> tuple[Path, Path]:
    data, cache = work / "data", work / "teacher"
    if not (data / "manifest.json").is_file():
        sample_data(
            SampleConfig(
                sources=[SourceSpec.model_validate(x) for x in sources],
                tokenizer=str(model_dir),
                search_tokens=search_tokens,
                distill_tokens=0,
                eval_tokens=eval_tokens,
                output=str(data),
            )
        )
    if not (cache / "manifest.json").is_file():
        teacher_logits(TeacherLogitsConfig(model=str(model_dir), data=str(data), output=str(cache), splits=["search"]))
    return data, cache


def run(model_dir: Path, ratios: list[float], args, exhaustive: bool) -> list[dict]:
    # The sampled data and its teacher cache are kept per split size (the default keeps its old name).
    from end_to_end import sources

    # The pipeline's data: eval from the model's held-out files, search from its training files.
    work = CACHE / f"selection-{model_dir.name}-train-s{args.search_tokens}-e{args.eval_tokens}"
    data, cache_dir = prepare(
        model_dir, work, args.search_tokens, args.eval_tokens,
        sources("validation" if args.validation else "reference", model_dir),
    )  # fmt: skip
    model = load_causal_lm(model_dir, "float32")
    L = model.config.num_hidden_layers
    eval_ids = load_split(str(data), "eval")
    cache = TeacherTopK(str(cache_dir))
    search = cache.load("search")
    calib = Calibration.from_batch(search, args.calibration_sequences)
    # The search-split KL of every row (and the exhaustive optimum) on the split's held-back part, the
    # last final_sequences sequences: what the search's final selection and `best` score on.
    held = SearchConfig.model_fields["final_sequences"].default
    full = Calibration.from_batch({k: v[-held:] for k, v in search.items()})
    previous = {}
    if args.reuse_baselines:
        for r in json.loads((HERE / "results" / f"{args.name}.json").read_text())["rows"]:
            previous[(r["ratio"], r["method"])] = r

    def row(ratio: float, method: str, keep: list[int], removed: list[int], **extra) -> dict:
        r = {
            "ratio": ratio,
            "method": method,
            "removed": removed,
            "ppl": heldout_ppl(model, eval_ids, keep),
            "search_kl": masked_loss(model, full, keep, "kl", 16),
            **extra,
        }
        print(r, flush=True)
        return r

    rows = [row(0.0, "none (teacher)", list(range(L)), [], seconds=0.0, tokens=0, layer_tokens=0)]
    for ratio in ratios:
        n = n_remove_for(ratio, L)
        methods = ["last", "random", "block_influence", "angular", "kl_oneshot", "sleb"]
        if exhaustive:
            methods.append("exhaustive")
        for method in methods:
            if (ratio, method) in previous:
                old = previous[(ratio, method)]
                removed = old["removed"]
                keep = [i for i in range(L) if i not in removed]
                rows.append(
                    row(
                        ratio,
                        method,
                        keep,
                        removed,
                        seconds=old["seconds"],
                        tokens=old["tokens"],
                        layer_tokens=old["layer_tokens"],
                        reused=True,
                    )
                )
                continue
            use = full if method == "exhaustive" else calib
            sel = SELECTORS[method](model, use, n, seed=0)
            tokens = 0 if method in ("last", "random") else use.tokens
            rows.append(
                row(
                    ratio,
                    method,
                    sel.keep,
                    sel.removed,
                    seconds=sel.seconds,
                    tokens=tokens,
                    layer_tokens=sel.layer_tokens,
                )
            )
        out = work / f"search-{ratio}"
        res = search_mask(
            SearchConfig(
                model=str(model_dir),
                teacher_cache=str(cache_dir),
                output=str(out),
                selection_method="e3",
                remove_ratio=ratio,
                search_tokens=args.e3_tokens,
                init_sequences=args.e3_init_sequences,
                final_sequences=args.e3_final_sequences,
                overwrite=True,
                seed=args.seed,
            )
        )
        rows.append(
            row(
                ratio,
                "e3 (Gumbel-TopK search)",
                res["keep"],
                res["removed"],
                seconds=res["seconds"],
                # training steps + the KL initialisation + the held-back sequences of the final selection
                tokens=res["search_tokens"]
                + (res["config"]["init_sequences"] + res["held_back_sequences"]) * cache.seq_len,
                layer_tokens=res["layer_tokens"],
                chosen_from=res["chosen_from"],
            )
        )
    return rows


def render(rows: list[dict], title: str, args, model_dir: Path) -> str:
    lines = [
        f"# {title}",
        "",
        f"Model `{model_dir.name}`; held-out perplexity on the eval split ({args.eval_tokens:,} tokens), "
        "masked view, no distillation. Lower is better; the best per ratio is in bold.",
        f"Calibration for the baselines: {args.calibration_sequences} search-split sequences; E³ search: "
        f"{args.e3_tokens:,} search-split tokens, KL initialisation on {args.e3_init_sequences} and final "
        f"candidates scored on {args.e3_final_sequences} sequences, seed {args.seed}, otherwise the default `SearchConfig`.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "Search-split KL: mean KL(teacher top-10 ‖ pruned) on the search split's held-back part (its last 128",
        "sequences), the objective every KL-based selector optimises. Baseline wall times marked *",
        "come from an earlier run of this script on the same machine (their choices are deterministic).",
        "",
        "| removed | method | layers removed | held-out ppl | search-split KL | wall s | tokens read | layer-tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ratio in sorted({r["ratio"] for r in rows}):
        group = [r for r in rows if r["ratio"] == ratio]
        best = min(r["ppl"] for r in group)
        for r in group:
            ppl = f"**{r['ppl']:.2f}**" if r["ppl"] == best and ratio > 0 else f"{r['ppl']:.2f}"
            lines.append(
                f"| {ratio:.0%} | {r['method']} | {r['removed']} | {ppl} | {r['search_kl']:.4f} | "
                f"{r['seconds']:.1f}{'*' if r.get('reused') else ''} | "
                f"{r['tokens']:,} | {r['layer_tokens']:,} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="12-layer variant with the exhaustive optimum")
    ap.add_argument("--ratios", default="0.25,0.4")
    ap.add_argument(
        "--search-tokens",
        type=int,
        default=SampleConfig.model_fields["search_tokens"].default,
        help="size of the search split (default: the pipeline's, the search budget plus the held-back part)",
    )
    ap.add_argument("--validation", action="store_true", help="the validation model (benchmarks/validation_model.py)")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--calibration-sequences", type=int, default=16)
    ap.add_argument("--e3-tokens", type=int, default=SearchConfig.model_fields["search_tokens"].default)
    ap.add_argument(
        "--e3-init-sequences",
        type=int,
        default=SearchConfig.model_fields["init_sequences"].default,
        help="search-split sequences of the E³ KL initialisation",
    )
    ap.add_argument(
        "--e3-final-sequences",
        type=int,
        default=SearchConfig.model_fields["final_sequences"].default,
        help="search-split sequences that score E³'s final candidates",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--reuse-baselines",
        action="store_true",
        help="take the baselines' choices, times and costs from the last results file (they are deterministic); "
        "recompute their perplexity and search-split KL, and rerun only the E³ search",
    )
    args = ap.parse_args()
    args.name = "selection-12L" if args.small else "selection-validation" if args.validation else "selection"
    if args.search_tokens != SampleConfig.model_fields["search_tokens"].default and not args.small:
        args.name += f"-search{args.search_tokens // 1024}k"  # another split size keeps its own file
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.validation:
        from validation_model import validation_model

        model_dir = validation_model()
    else:
        model_dir = small_model() if args.small else MODEL_DIR
    started = time.time()
    rows = run(model_dir, ratios, args, exhaustive=args.small)
    name = args.name
    title = (
        "Layer selection, 12-layer variant (with the exhaustive optimum)"
        if args.small
        else "Layer selection, validation model (Llama, 20 layers; never used to tune)"
        if args.validation
        else "Layer selection"
    )
    text = (
        render(rows, title, args, model_dir) + f"\nTotal benchmark time {time.time() - started:.0f} s. "
        f"Command: `python benchmarks/selection.py {' '.join(sys.argv[1:])}`\n"
    )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.md").write_text(text)
    (HERE / "results" / f"{name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
