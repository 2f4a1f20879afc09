"""End-to-end study: which selector and which recovery loss give the best model *after* distillation.

On two models — the shipped reference model (Qwen3 layout, 24 layers) and the independent
validation model (``benchmarks/validation_model.py``: Llama layout, 20 layers, its own seed and its
own deduplicated split, never used to tune) — at 25 % and 40 % of the layers removed:

- selectors: E³ (the Gumbel-TopK search at its defaults), SLEB, Block Influence and last-n, each
  through ``search_mask`` with ``selection_method`` as the pipeline runs it, and ``best`` (E³ and
  SLEB judged on the search's held-back sequences);
- recovery from each hardened checkpoint: ``ce`` (plain fine-tuning), ``kd`` (plain top-K KD),
  ``entropy_kd`` with λ = 1 (the paper's loss) and with λ = 0 (the entropy weighting alone), all
  at the step's defaults otherwise (AdamW lr 3e-4, batch 8 × 256, γ = 1, ε = 0.1);
- equal tokens, never repeated: 524,288 distill tokens for the whole grid, read once from a
  distill split that no search saw; about 1.77 M for the best three cells of each model and ratio;
- three seeds on the cells that decide a default (E³, SLEB and ``best`` × ``kd``, ``entropy_kd``
  λ = 1 and λ = 0): seed s draws its own sample of search and distill data (``sample`` with seed s)
  and runs the search with seed s; the eval split of a model is the same for every seed;
- reported: held-out perplexity on the eval split (held-out files, never sampled for search or
  distill), top-1 agreement and KL with the teacher (full vocabulary, ``evaluate``), and accuracy on
  the next-line cloze task (``python_stdlib_cloze``: for the validation model the items are built
  by the same builder from *its* held-out files, since the shipped items are partly its training
  text), scored as lm-eval's ``acc`` is (sum of the continuation's log-probabilities; checked
  against lm-eval by ``check-cloze``).

Everything runs in fp32 (teacher cache, search, distillation, evaluation), so a GPU run and a CPU
run of a cell agree to float reduction order. Three commands:

    python benchmarks/end_to_end.py prepare            # sample the data (needs `datasets`), write the bundle
    python benchmarks/end_to_end.py run --out DIR      # the grid, on a GPU or the CPU; results.jsonl in DIR
    python benchmarks/end_to_end.py report DIR/results.jsonl   # benchmarks/results/end-to-end.{md,json}

The committed results (``benchmarks/results/end-to-end.md``) ran on one H200 through the project's
device tool in 6.8 min with 14 workers: ``prepare --bundle`` here (the GPU image has no ``datasets``),
the bundle and pydantic wheels carried, then ``run --work <unpacked> --validation-model <unpacked>
--workers 14 --deadline 420`` (every task finished before the deadline). On 2 CPU cores the same
grid would take about 10 hours (a 524,288-token distillation is about 4 minutes on one thread).

``run`` works through a queue of tasks in worker processes (``--workers``), cheapest dependencies
first; with ``--deadline`` it starts no task after that many seconds, and every finished task is a
line in ``results.jsonl`` at once, so a run cut short keeps what it finished and a second ``run``
with the same ``--out`` does only what is missing.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
BUNDLE = ROOT / ".e2e"  # ignored (.git/info/exclude): what `prepare` writes for a run elsewhere
RATIOS = (0.25, 0.4)
SELECTORS = ("e3", "sleb", "block_influence", "last")
DECIDING_SELECTORS = ("e3", "sleb", "best")
LOSSES: dict[str, dict[str, Any]] = {
    "ce": {"loss": "ce"},
    "kd": {"loss": "kd"},
    "entropy_kd": {"loss": "entropy_kd", "ce_weight": 1.0},
    "entropy_kd_l0": {"loss": "entropy_kd", "ce_weight": 0.0},
}
DECIDING_LOSSES = ("kd", "entropy_kd", "entropy_kd_l0")
SEEDS = (0, 1, 2)
SEQ = 256
SIZES = {  # tokens; the search split is the default (search budget + held-back sequences)
    "search": 647168,
    "eval": 65536,
    "distill": 524288,
    "distill_long": 1769472,  # 6,912 sequences: what the smaller training corpus leaves after search
}
SMOKE_SIZES = {"search": 24576, "eval": 8192, "distill": 8192, "distill_long": 16384}


# ---------------------------------------------------------------------------------------------- models


def model_dirs(validation: str | None = None) -> dict[str, Path]:
    from e3prune.reference import MODEL_DIR

    if validation is None:
        from validation_model import validation_model

        validation = str(validation_model())
    return {"reference": Path(MODEL_DIR), "validation": Path(validation)}


def sources(name: str, model_dir: Path) -> list[dict[str, Any]]:
    """Eval from the model's held-out files; search and distill from its training files."""
    if name == "reference":
        from e3prune.data import DEFAULT_SOURCES

        return [dict(s) for s in DEFAULT_SOURCES]
    return [
        {"uri": str(model_dir / "heldout_corpus.jsonl.gz"), "name": "heldout", "splits": ["eval"]},
        {"uri": str(model_dir / "train_corpus.jsonl.gz"), "name": "train", "splits": ["search", "distill"]},
    ]


# ---------------------------------------------------------------------------------------------- prepare


def prepare(args) -> None:
    """Sample each model's data for each seed and build the validation model's cloze items."""
    from e3prune.data import SampleConfig, SourceSpec, sample_data
    from e3prune.lm_eval_tasks import CLOZE_DATA
    from e3prune.lm_eval_tasks.build import build_items, read_corpus, render

    sizes = SMOKE_SIZES if args.smoke else SIZES
    work = Path(args.work)
    models = model_dirs(args.validation_model) if "validation" in args.models else model_dirs("-")
    for name, model_dir in models.items():
        if name not in args.models:
            continue
        for seed in SEEDS:
            data = work / name / f"s{seed}" / "data"
            if (data / "manifest.json").is_file():
                continue
            distill = sizes["distill_long"] if seed == 0 else sizes["distill"]
            sample_data(
                SampleConfig(
                    sources=[SourceSpec.model_validate(s) for s in sources(name, model_dir)],
                    tokenizer=str(model_dir),
                    search_tokens=sizes["search"],
                    distill_tokens=distill,
                    eval_tokens=sizes["eval"],
                    seed=seed,
                    output=str(data),
                )
            )
        cloze = work / name / "cloze.jsonl"
        if name == "reference":
            shutil.copyfile(CLOZE_DATA, cloze)
        else:
            cloze.write_text(render(build_items(read_corpus(model_dir / "heldout_corpus.jsonl.gz"))))
    if args.bundle:
        BUNDLE.mkdir(exist_ok=True)
        with tarfile.open(BUNDLE / "e2e.tar.xz", "w:xz", preset=6) as tar:
            tar.add(work, arcname="work")
            tar.add(models["validation"], arcname="validation-model")
        print("bundle", BUNDLE / "e2e.tar.xz", (BUNDLE / "e2e.tar.xz").stat().st_size // 1024, "KiB")


# ---------------------------------------------------------------------------------------------- tasks
# Each task is a top-level function (it runs in a worker process) that takes and returns plain dicts.


def _worker_init() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # progress bars of many workers would bury the log
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    torch.set_num_threads(int(os.environ.get("E2E_THREADS", "1")))
    import logging

    logging.basicConfig(level=logging.WARNING)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def task_teacher(t: dict) -> dict:
    from e3prune.teacher import TeacherLogitsConfig, teacher_logits

    out = Path(t["dir"]) / "teacher"
    teacher_logits(
        TeacherLogitsConfig(
            model=t["model"],
            data=str(Path(t["dir"]) / "data"),
            output=str(out),
            splits=["search", "distill"],
            dtype="float32",
            device=_device(),
            overwrite=True,
        )
    )
    return {}


def _evaluate(t: dict, role: str, path: str, out: str) -> dict:
    from e3prune.evaluate import EvaluateConfig, evaluate

    m = evaluate(
        EvaluateConfig(
            teacher=t["model"],
            **{role: path},
            data=t["eval_data"],  # seed 0's eval split for every seed: one text per model
            speed=False,
            dtype="float32",
            device=_device(),
            output=out,
            overwrite=True,
        )
    )
    c = m["comparisons"][role]
    return {
        "teacher_ppl": m["models"]["teacher"]["perplexity"],
        "ppl": m["models"][role]["perplexity"],
        "top1_agreement": c["top1_agreement"],
        "kl": c["kl"],
        "cloze_acc": cloze_accuracy(path, t["cloze"]),
    }


def _harden_and_evaluate(t: dict, selector: str, keep: list[int]) -> dict:
    from e3prune.harden import HardenConfig, harden_checkpoint

    d = Path(t["dir"])
    pruned = d / f"pruned-{t['ratio']}-{selector}"
    harden_checkpoint(
        HardenConfig(model=t["model"], output=str(pruned), keep_layers=keep, method="manual", device=_device(),
                     overwrite=True)
    )  # fmt: skip
    return _evaluate(t, "pruned", str(pruned), str(d / f"eval-pruned-{t['ratio']}-{selector}"))


def task_select(t: dict) -> dict:
    """A selection through ``search_mask`` (``selection_method`` as the pipeline passes it), hardened,
    and the pruned model evaluated.

    ``best`` runs the E³ search (the same search as ``selection_method: e3``, same seed) and SLEB (the
    same 16 calibration sequences as ``selection_method: sleb``: the first ones, never the held-back
    ones), so one ``best`` task gives E³'s set, SLEB's set and the pick; both sets are hardened."""
    from e3prune.search import SearchConfig, search_mask

    d = Path(t["dir"])
    res = search_mask(
        SearchConfig(
            model=t["model"],
            teacher_cache=str(d / "teacher"),
            output=str(d / f"select-{t['ratio']}-{t['selector']}"),
            remove_ratio=t["ratio"],
            selection_method=t["selector"],
            seed=t["seed"],
            device=_device(),
            overwrite=True,
            **t.get("search", {}),
        )
    )
    L = res["num_hidden_layers"]
    if t["selector"] != "best":
        return {
            "sets": {
                t["selector"]: {
                    "removed": res["removed"],
                    "search_seconds": res.get("search_seconds"),
                    "layer_tokens": res.get("layer_tokens"),
                    **_harden_and_evaluate(t, t["selector"], res["keep"]),
                }
            }
        }
    e3 = json.loads((d / f"select-{t['ratio']}-best.e3" / "search.json").read_text())
    sets = {}
    for c in res["candidates"]:
        removed = sorted(set(range(L)) - set(c["keep"]))
        sets[c["source"]] = {
            "removed": removed,
            "held_back_kl": c["held_back_kl"],
            **_harden_and_evaluate(t, c["source"], c["keep"]),
        }
    sets["e3"].update(
        search_seconds=e3.get("seconds"), layer_tokens=e3.get("layer_tokens"), chosen_from=e3.get("chosen_from")
    )
    return {"sets": sets, "best": res["chosen_from"].rsplit(" ", 1)[-1], "best_seconds": res.get("search_seconds")}


def task_distill(t: dict) -> dict:
    from e3prune.distill import DistillConfig, distill

    d = Path(t["dir"])
    out = d / f"student-{t['ratio']}-{t['selector']}-{t['loss']}-{t['tokens']}"
    t0 = time.time()
    summary = distill(
        DistillConfig(
            student=str(d / f"pruned-{t['ratio']}-{t['selector']}"),
            teacher_cache=str(d / "teacher"),
            output=str(out),
            distill_tokens=t["tokens"],
            allow_repeat=False,
            mixed_precision="no",
            seed=t["seed"],
            checkpoint_every_steps=100000,
            log_every_steps=1000,
            processes=1,
            overwrite=True,
            **LOSSES[t["loss"]],
        )
    )
    seconds = time.time() - t0
    row = _evaluate(t, "student", str(out), str(d / f"eval-{out.name}"))
    row["distill_seconds"] = round(seconds, 1)
    row["steps"] = summary.get("steps")
    shutil.rmtree(out, ignore_errors=True)  # only the numbers are kept; disk is bounded
    return row


# ---------------------------------------------------------------------------------------------- cloze


def cloze_accuracy(model_dir: str, items_path: str) -> float:
    """Share of cloze items whose true line has the highest summed log-probability: lm-eval's
    ``acc`` for a ``multiple_choice`` task (``_encode_pair``: the continuation is the tokens of
    context + choice after those of the context; sequences cut to the model's positions on the left)."""
    import torch
    from transformers import AutoTokenizer

    from e3prune.model_io import load_causal_lm

    device = _device()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir, "float32").to(device).eval()
    max_len = getattr(model.config, "max_position_embeddings", 2048)
    items = [json.loads(line) for line in Path(items_path).read_text().splitlines() if line.strip()]
    correct = 0
    with torch.no_grad():
        for it in items:  # the four choices of an item in one right-padded batch (padding never attended)
            # lm-eval moves the context's trailing whitespace (here its last newline) into the continuation
            context = it["context"].rstrip()
            moved = it["context"][len(context) :]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            seqs, conts = [], []
            for choice in it["choices"]:
                whole = tok(context + moved + choice, add_special_tokens=False)["input_ids"]
                cont = whole[len(ctx) :]
                seqs.append((ctx + cont)[-(max_len + 1) :][:-1])
                conts.append(cont)
            width = max(len(q) for q in seqs)
            x = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, q in enumerate(seqs):
                x[i, : len(q)] = torch.tensor(q)
                mask[i, : len(q)] = 1
            logp = torch.log_softmax(
                model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits.float(), -1
            ).cpu()
            scores = []
            for i, (q, cont) in enumerate(zip(seqs, conts, strict=True)):
                start = len(q) - len(cont)
                scores.append(sum(logp[i, start + j, c].item() for j, c in enumerate(cont)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == it["label"])
    return correct / len(items)


# ---------------------------------------------------------------------------------------------- run


def key(t: dict) -> str:
    return "|".join(str(t.get(k, "")) for k in ("kind", "model_name", "seed", "ratio", "selector", "loss", "tokens"))


class Plan:
    """The task graph: what is done (results.jsonl), what is ready, and what a finished task unlocks."""

    def __init__(self, args, models: dict[str, Path], sizes: dict[str, int]):
        self.args, self.models, self.sizes = args, models, sizes
        self.work = Path(args.work)
        self.results = Path(args.out) / "results.jsonl"
        self.done: dict[str, dict] = {}
        if self.results.is_file():
            for line in self.results.read_text().splitlines():
                row = json.loads(line)
                if "error" not in row:
                    self.done[row["key"]] = row

    def base(self, name: str, seed: int) -> dict:
        d = self.work / name / f"s{seed}"
        return {
            "model_name": name,
            "model": str(self.models[name]),
            "seed": seed,
            "dir": str(d),
            "cloze": str(self.work / name / "cloze.jsonl"),
            "eval_data": str(self.work / name / "s0" / "data"),
        }

    def search_settings(self) -> dict:
        if not self.args.smoke:
            return {}
        return {"search_tokens": 8192, "init_sequences": 8, "final_sequences": 16}

    def teacher_tasks(self) -> list[dict]:
        return [{**self.base(n, s), "kind": "teacher", "priority": 0} for n in self.models for s in self.args.seeds]

    def select_tasks(self, name: str, seed: int) -> list[dict]:
        selectors = ("best", "block_influence", "last") if seed == 0 else ("best",)
        return [
            {**self.base(name, seed), "kind": "select", "ratio": r, "selector": m, "priority": 1,
             "search": self.search_settings()}
            for r in RATIOS for m in selectors
        ]  # fmt: skip

    def distill_tasks(self, sel: dict, row: dict) -> list[dict]:
        """What a finished selection unlocks: the grid (seed 0) or the deciding cells (seeds 1, 2)."""
        seed = sel["seed"]
        losses = LOSSES if seed == 0 else DECIDING_LOSSES
        return [
            {**self.base(sel["model_name"], seed), "kind": "distill", "ratio": sel["ratio"], "selector": selector,
             "loss": loss, "tokens": self.sizes["distill"], "priority": 2 if seed == 0 else 3,
             "removed": found["removed"]}
            for selector, found in row["sets"].items() for loss in losses
        ]  # fmt: skip

    def long_tasks(self, name: str, ratio: float) -> list[dict]:
        """The best three cells of the grid (seed 0) of one model and ratio, at the long budget."""
        grid = [
            r
            for r in self.done.values()
            if r["kind"] == "distill"
            and r["model_name"] == name
            and r["seed"] == 0
            and r["ratio"] == ratio
            and r["tokens"] == self.sizes["distill"]
            and r["selector"] in SELECTORS
        ]
        best = sorted(grid, key=lambda r: r["ppl"])[:3]
        return [
            {
                **self.base(name, 0),
                "kind": "distill",
                "ratio": ratio,
                "selector": r["selector"],
                "loss": r["loss"],
                "tokens": self.sizes["distill_long"],
                "priority": 4,
                "removed": r["removed"],
            }
            for r in best
        ]


def run(args) -> None:
    sizes = SMOKE_SIZES if args.smoke else SIZES
    models = {k: v for k, v in model_dirs(args.validation_model).items() if k in args.models}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(args, models, sizes)
    started = time.time()
    fns = {"teacher": task_teacher, "select": task_select, "distill": task_distill}

    pending: list[dict] = []
    long_started: set[tuple[str, float]] = set()

    def unlock(t: dict, row: dict) -> None:
        if t["kind"] == "teacher":
            pending.extend(plan.select_tasks(t["model_name"], t["seed"]))
        elif t["kind"] == "select":
            pending.extend(plan.distill_tasks(t, row))
        cell = (t["model_name"], t.get("ratio"))
        if (
            t["kind"] == "distill"
            and t["seed"] == 0
            and t["tokens"] == sizes["distill"]
            and cell not in long_started
            and sum(
                1
                for r in plan.done.values()
                if r["kind"] == "distill"
                and r["seed"] == 0
                and (r["model_name"], r["ratio"]) == cell
                and r["tokens"] == sizes["distill"]
                and r["selector"] in SELECTORS
            )
            == len(SELECTORS) * len(LOSSES)
        ):
            long_started.add(cell)
            pending.extend(plan.long_tasks(*cell))

    def finish(t: dict, row: dict) -> None:
        row = {
            **{k: v for k, v in t.items() if k not in ("dir", "model", "cloze", "eval_data", "search", "priority")},
            **row,
            "key": key(t),
            "device": _device_name(),
        }
        with open(plan.results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if "error" not in row:
            plan.done[row["key"]] = row
            unlock(t, row)
        print(
            f"[{time.time() - started:6.0f}s] {row['key']} "
            + (f"ERROR {row['error']}" if "error" in row else f"ppl {row.get('ppl', 0):.3f}"),
            flush=True,
        )

    (out / "run.json").write_text(json.dumps({"machine": machine(), "workers": args.workers}, indent=1))
    pending.extend(plan.teacher_tasks())
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_worker_init) as pool:
        running: dict[cf.Future, dict] = {}
        while pending or running:
            # tasks already done (an earlier run with this --out) are replayed without running
            while any(key(t) in plan.done for t in pending):
                for t in [t for t in pending if key(t) in plan.done]:
                    pending.remove(t)
                    unlock(t, plan.done[key(t)])
            pending.sort(key=lambda t: (t["priority"], -t.get("tokens", 0)))
            out_of_time = args.deadline and time.time() - started > args.deadline
            while pending and len(running) < args.workers and not out_of_time:
                t = pending.pop(0)
                running[pool.submit(_call, fns[t["kind"]], t)] = t
            if not running:
                break
            done, _ = cf.wait(running, timeout=30, return_when=cf.FIRST_COMPLETED)
            for f in done:
                t = running.pop(f)
                finish(t, f.result())
        left = [key(t) for t in pending]
    summary = {
        "seconds": round(time.time() - started, 1),
        "not_run": left,
        "workers": args.workers,
        "machine": machine(),
    }
    (out / "run.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def _call(fn, t: dict) -> dict:
    t0 = time.time()
    try:
        row = fn(t)
    except Exception as e:  # one failed cell must not stop the study; it is reported
        import traceback

        return {
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-2000:],
            "seconds": round(time.time() - t0, 1),
        }
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def machine() -> str:
    import torch
    import transformers

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {_device_name()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


# ---------------------------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def report(args) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    latest: dict[str, dict] = {}
    for r in rows:
        latest[r["key"]] = r
    rows = list(latest.values())
    run_info = {}
    run_json = Path(args.results).with_name("run.json")
    if run_json.is_file():
        run_info = json.loads(run_json.read_text())
    selects = [r for r in rows if r["kind"] == "select"]
    distills = [r for r in rows if r["kind"] == "distill"]
    budgets = sorted({r["tokens"] for r in distills}) or [SIZES["distill"]]
    sizes = {"distill": budgets[0], "distill_long": budgets[-1] if len(budgets) > 1 else SIZES["distill_long"]}
    S = {"e3": "E³", "sleb": "SLEB", "block_influence": "Block Influence", "last": "last-n", "best": "best"}
    Lname = {"ce": "CE", "kd": "KD", "entropy_kd": "entropy λ=1", "entropy_kd_l0": "entropy λ=0"}

    def sets(model: str, seed: int, ratio: float) -> dict[str, dict]:
        out = {}
        for r in selects:
            if (r["model_name"], r["seed"], r["ratio"]) == (model, seed, ratio):
                out.update(r["sets"])
        return out

    def pick(model: str, seed: int, ratio: float) -> str | None:
        for r in selects:
            if (r["model_name"], r["seed"], r["ratio"], r["selector"]) == (model, seed, ratio, "best"):
                return r["best"]
        return None

    def cell(model: str, seed: int, ratio: float, selector: str, loss: str, tokens: int) -> dict | None:
        if selector == "best":
            selector = pick(model, seed, ratio) or "?"
        for r in distills:
            if (r["model_name"], r["seed"], r["ratio"], r["selector"], r["loss"], r["tokens"]) == (
                model,
                seed,
                ratio,
                selector,
                loss,
                tokens,
            ):
                return r
        return None

    models = sorted({r["model_name"] for r in rows}, key=lambda m: m != "reference")
    title = {
        "reference": "Reference model (Qwen3 layout, 24 layers, the shipped model)",
        "validation": "Validation model (Llama layout, 20 layers, own seed and split; never used to tune)",
    }
    lines = [
        "# End-to-end: selector × recovery loss, after distillation",
        "",
        "Written by `python benchmarks/end_to_end.py report` from the rows of `end_to_end.py run` "
        "(`benchmarks/results/end-to-end.json` holds every row). Protocol: the module docstring of "
        "`benchmarks/end_to_end.py`; in short, held-out perplexity on each model's eval split (its held-out "
        "files), search and distill data from its training files, distill tokens read once "
        f"({sizes['distill']:,} for the grid, {sizes['distill_long']:,} for the long runs), fp32 everywhere, the "
        "step defaults otherwise. Cloze: accuracy on 100 next-line items over the model's held-out files "
        "(chance 0.25). Gap closed: share of the pruned-to-teacher perplexity gap that distillation closed.",
        "",
        f"Machine: {run_info.get('machine', '?')}; {run_info.get('workers', '?')} worker processes; "
        f"run time {run_info.get('seconds', 0) / 60:.1f} min.",
        "",
    ]
    summary: dict[str, Any] = {}
    for m in models:
        teacher = next((r["teacher_ppl"] for r in rows if r["model_name"] == m and "teacher_ppl" in r), None)
        if teacher is None:
            teacher = next(
                (s["teacher_ppl"] for r in selects if r["model_name"] == m for s in r["sets"].values()), None
            )
        lines += [
            f"## {title.get(m, m)}",
            "",
            f"Teacher held-out perplexity **{_fmt(teacher)}**.",
            "",
            "### Selection before recovery (seed 0)",
            "",
            "| removed | selector | layers removed | pruned ppl | top-1 | KL | cloze | held-back KL | search s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for ratio in RATIOS:
            found = sets(m, 0, ratio)
            for sel in SELECTORS:
                f = found.get(sel)
                if f is None:
                    continue
                lines.append(
                    f"| {ratio:.0%} | {S[sel]} | {f['removed']} | {_fmt(f['ppl'])} | {_fmt(f['top1_agreement'], '.4f')} | "
                    f"{_fmt(f['kl'], '.4f')} | {_fmt(f['cloze_acc'])} | {_fmt(f.get('held_back_kl'), '.4f')} | "
                    f"{_fmt(f.get('search_seconds'), '.1f')} |"
                )
            if pick(m, 0, ratio):
                lines.append(f"| {ratio:.0%} | best | picks {S[pick(m, 0, ratio)]} | | | | | | |")
        lines += [
            "",
            f"### After recovery, {sizes['distill']:,} tokens (seed 0)",
            "",
            "| removed | selector | loss | held-out ppl | gap closed | top-1 | KL | cloze |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for ratio in RATIOS:
            group = [
                (sel, loss, cell(m, 0, ratio, sel, loss, sizes["distill"])) for sel in SELECTORS for loss in LOSSES
            ]
            group = [g for g in group if g[2] is not None]
            if not group:
                continue
            best_ppl = min(c["ppl"] for _, _, c in group)
            pruned = sets(m, 0, ratio)
            for sel, loss, c in group:
                p = pruned.get(sel, {}).get("ppl")
                gap = (p - c["ppl"]) / (p - c["teacher_ppl"]) if p and p != c["teacher_ppl"] else None
                ppl = f"**{c['ppl']:.2f}**" if c["ppl"] == best_ppl else f"{c['ppl']:.2f}"
                lines.append(
                    f"| {ratio:.0%} | {S[sel]} | {Lname[loss]} | {ppl} | {_fmt(None if gap is None else 100 * gap, '.1f')} % | "
                    f"{c['top1_agreement']:.4f} | {c['kl']:.4f} | {c['cloze_acc']:.2f} |"
                )
        lines += [
            "",
            "### Cells that decide a default: three seeds",
            "",
            "Seed s: its own search/distill data sample and search seed; the eval split is the same. "
            "`best` is whichever of E³ and SLEB the held-back KL picked in that seed (picks in brackets).",
            "",
            "| removed | selector | loss | held-out ppl, mean ± sd | per seed | top-1 (mean) | KL (mean) | cloze (mean) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        decide: dict[str, Any] = {}
        for ratio in RATIOS:
            for sel in DECIDING_SELECTORS:
                for loss in DECIDING_LOSSES:
                    cs = [cell(m, s, ratio, sel, loss, sizes["distill"]) for s in SEEDS]
                    have = [c for c in cs if c is not None]
                    if not have:
                        continue
                    ppls = [c["ppl"] for c in have]
                    decide[f"{ratio}|{sel}|{loss}"] = ppls
                    picks = ""
                    if sel == "best":
                        picks = " (" + ", ".join(S.get(pick(m, s, ratio) or "?", "?") for s in SEEDS) + ")"
                    lines.append(
                        f"| {ratio:.0%} | {S[sel]} | {Lname[loss]} | {_mean_sd(ppls)} | "
                        f"{', '.join(_fmt(c['ppl']) if c else '—' for c in cs)}{picks} | "
                        f"{statistics.mean(c['top1_agreement'] for c in have):.4f} | "
                        f"{statistics.mean(c['kl'] for c in have):.4f} | {statistics.mean(c['cloze_acc'] for c in have):.2f} |"
                    )
        long = [r for r in distills if r["model_name"] == m and r["tokens"] == sizes["distill_long"]]
        if long:
            lines += [
                "",
                f"### The best three cells of each ratio at {sizes['distill_long']:,} tokens (seed 0)",
                "",
                f"| removed | selector | loss | ppl at {sizes['distill']:,} | ppl at {sizes['distill_long']:,} | top-1 | KL | cloze |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in sorted(long, key=lambda r: (r["ratio"], r["ppl"])):
                short = cell(m, 0, r["ratio"], r["selector"], r["loss"], sizes["distill"])
                lines.append(
                    f"| {r['ratio']:.0%} | {S[r['selector']]} | {Lname[r['loss']]} | {_fmt(short and short['ppl'])} | "
                    f"{r['ppl']:.2f} | {r['top1_agreement']:.4f} | {r['kl']:.4f} | {r['cloze_acc']:.2f} |"
                )
        summary[m] = decide
        lines.append("")
    if errors:
        lines += ["## Cells that failed", ""] + [f"- `{r['key']}`: {r['error']}" for r in errors] + [""]
    if run_info.get("not_run"):
        lines += ["## Not run (deadline)", "", ", ".join(f"`{k}`" for k in run_info["not_run"]), ""]
    lines += [
        "Commands: `python benchmarks/end_to_end.py prepare`, `... run --out DIR`, `... report DIR/results.jsonl`.",
        "",
    ]
    text = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "end-to-end.md").write_text(text)
    (RESULTS / "end-to-end.json").write_text(json.dumps({"run": run_info, "rows": rows, "errors": errors}, indent=1))
    print(text)


def check_cloze(args) -> None:
    """This script's cloze scoring against lm-eval's on the shipped task, for the shipped model."""
    from e3prune.evaluate import EvaluateConfig, evaluate
    from e3prune.lm_eval_tasks import CLOZE_DATA
    from e3prune.reference import MODEL_DIR

    ours = cloze_accuracy(str(MODEL_DIR), str(CLOZE_DATA))
    m = evaluate(
        EvaluateConfig(
            teacher=str(MODEL_DIR),
            pruned=str(MODEL_DIR),
            data=args.data,
            speed=False,
            lm_eval_tasks=["python_stdlib_cloze"],
            output=args.output,
            overwrite=True,
        )
    )
    theirs = m["lm_eval"]["python_stdlib_cloze"]["teacher"]["acc"]
    print(f"cloze acc: this script {ours:.4f}, lm-eval {theirs:.4f}")
    if abs(ours - theirs) > 1e-9:
        raise SystemExit("the cloze scoring differs from lm-eval's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="sample the data of both models for every seed")
    p.add_argument("--work", default=str(HERE / ".cache" / "end-to-end"))
    p.add_argument("--bundle", action="store_true", help=f"also write {BUNDLE}/e2e.tar.xz to carry to another machine")
    r = sub.add_parser("run", help="the study; results.jsonl in --out")
    r.add_argument("--work", default=str(HERE / ".cache" / "end-to-end"))
    r.add_argument("--out", required=True)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--deadline", type=float, default=0, help="start no task after this many seconds (0: none)")
    r.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=list(SEEDS))
    for q in (p, r):
        q.add_argument("--models", type=lambda v: v.split(","), default=["reference", "validation"])
        q.add_argument(
            "--validation-model", default=None, help="the validation model's directory (default: built and cached)"
        )
        q.add_argument("--smoke", action="store_true", help="tiny budgets: a dry run of the script")
    rep = sub.add_parser("report", help="benchmarks/results/end-to-end.{md,json} from a results.jsonl")
    rep.add_argument("results")
    c = sub.add_parser("check-cloze", help="the cloze scoring here against lm-eval's")
    c.add_argument("--data", required=True, help="a sampled data directory of the reference model")
    c.add_argument("--output", default=str(HERE / ".cache" / "check-cloze"))
    args = ap.parse_args()
    {"prepare": prepare, "run": run, "report": report, "check-cloze": check_cloze}[args.command](args)


if __name__ == "__main__":
    main()
