"""Validate the memory model of ``e3prune plan`` (e3prune/plan.py) against measured peaks on the CPU.

For three random-weight Qwen3 models ~10× apart in parameters (~5 M, ~58 M, ~0.6 B), saved with
``save_pretrained`` to a temporary directory, each heavy step runs in a fresh process, with the
step's own code, for two batches:

- teacher-logits: ``load_placed(…, "cpu")`` and :func:`e3prune.teacher.topk_logits`;
- search: ``load_placed(…, "cpu")``, the gated view and :func:`e3prune.search._search_step`
  (Gumbel-TopK mask, forward, top-K KL, backward to θ, one update);
- distill: ``load_causal_lm(…, "float32")``, the step's AdamW, loss and ``_accumulate`` under a
  CPU :class:`accelerate.Accelerator`, gradient clipping and the optimizer step.

The teacher's top-K (values, ids, lse) is random: the memory of a step does not depend on it.
The peak is the RSS high-water mark of that process (``getrusage(RUSAGE_CHILDREN).ru_maxrss``
read by a fresh parent that waited for it alone), minus the same of a process that imports the
same modules and does nothing else. The prediction is :func:`e3prune.plan.plan` in its CPU mode
(fp32, one process) with the same batch and sequence length.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_model.py --write
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_model.py --models 5m,60m   # quick

Run it alone: the 0.6 B distill step peaks near 12 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.md"
SECTION = "## Memory model validation"
BATCH, SEQ_LEN, STEPS = 4, 256, 2
MODELS = {  # Qwen3 architecture, random weights
    "5m": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, tie_word_embeddings=False),
    "60m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}  # fmt: skip
STEP_NAMES = ("teacher-logits", "search", "distill")


def build(name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(**MODELS[name], max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)


def _imports():
    import accelerate  # noqa: F401
    import torch
    from transformers.models.qwen3 import modeling_qwen3  # noqa: F401

    from e3prune import distill_training, placement, search, teacher  # noqa: F401

    return torch


def _fake_cache(torch, vocab: int, k: int, n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(n, SEQ_LEN, k, generator=g).sort(dim=-1, descending=True).values
    return {
        "input_ids": torch.randint(0, vocab, (n, SEQ_LEN), generator=g),
        "values": values.to(torch.bfloat16),
        "ids": torch.randint(0, vocab, (n, SEQ_LEN, k), generator=g).to(torch.int32),
        "lse": values[..., 0] + 2.0,
    }


def worker(step: str, model_dir: str) -> None:
    """One step on one model, ``STEPS`` batches; the process's peak RSS is what the parent reads."""
    torch = _imports()
    if step == "idle":
        return
    from e3prune.placement import load_placed

    if step == "teacher-logits":
        from e3prune.teacher import topk_logits

        model, device = load_placed(model_dir, "cpu")
        data = _fake_cache(torch, model.config.vocab_size, 10, BATCH * STEPS)
        for i in range(STEPS):
            topk_logits(model, data["input_ids"][i * BATCH : (i + 1) * BATCH], 10)
    elif step == "search":
        from e3prune.masking import gated_layers
        from e3prune.resumable import ResumableState
        from e3prune.search import SearchConfig, SearchRun, SearchState, _optimizer, _search_step
        from e3prune.selection import Meter, n_remove_for

        cfg = SearchConfig.parse(model=model_dir, teacher_cache="/unused", output="/unused", batch_size=BATCH)
        model, device = load_placed(model_dir, "cpu")
        model.requires_grad_(False)
        L = model.config.num_hidden_layers
        data = _fake_cache(torch, model.config.vocab_size, 10, BATCH * STEPS)
        store = ResumableState(str(Path(tempfile.mkdtemp()) / "state"), "benchmark", field="state")
        run = SearchRun(cfg, model, data, L, L - n_remove_for(cfg.remove_ratio, L), STEPS, BATCH * SEQ_LEN, store)
        theta = torch.nn.Parameter(torch.zeros(L))
        state = SearchState(0, theta, _optimizer(cfg, theta), torch.Generator().manual_seed(0),
                            torch.arange(BATCH * STEPS), [], [0.0] * L, [0.0] * L, Meter(), 0.0)  # fmt: skip
        with gated_layers(model) as gates:
            for _ in range(STEPS):
                _search_step(run, state, gates)
    elif step == "distill":
        from accelerate import Accelerator

        from e3prune.distill import DistillConfig
        from e3prune.distill_loss import build_loss
        from e3prune.distill_training import Training, _accumulate, _optimizer, _trainable_parameters
        from e3prune.model_io import load_causal_lm

        cfg = DistillConfig.parse(student=model_dir, teacher_cache="/unused", output="/unused", batch_size=BATCH)
        accelerator = Accelerator(cpu=True)
        model = load_causal_lm(model_dir, "float32", field="student")
        model.config.use_cache = False
        model.train()
        optimizer = _optimizer(_trainable_parameters(model, cfg.trainable), cfg)
        model, optimizer = accelerator.prepare(model, optimizer)
        training = Training(model, optimizer, None, build_loss(cfg))
        data = _fake_cache(torch, model.config.vocab_size, 10, BATCH * STEPS)
        for i in range(STEPS):
            batch = {k: v[i * BATCH : (i + 1) * BATCH] for k, v in data.items()}
            _accumulate(accelerator, cfg, training, batch, None)
            accelerator.clip_grad_norm_(training.model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        raise SystemExit(f"unknown step {step!r}")


def measure(step: str, model_dir: str) -> dict:
    """Peak RSS (bytes) of a fresh worker process, read by this (fresh) process after waiting for it alone."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--worker", step, model_dir], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{step} on {model_dir} failed:\n{proc.stderr[-3000:]}")
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "seconds": time.time() - t0}


def measured(step: str, model_dir: str) -> dict:
    """:func:`measure` in its own parent process, so RUSAGE_CHILDREN holds that one worker only."""
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", step, model_dir], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted(model_dir: str) -> dict[str, int]:
    from e3prune.plan import PlanConfig, plan

    cfg = PlanConfig.parse(
        model=model_dir, device="cpu", seq_len=SEQ_LEN, teacher_batch_size=BATCH, search_batch_size=BATCH,
        distill_batch_size=BATCH,
    )  # fmt: skip
    return {s["step"]: s["memory_bytes"] for s in plan(cfg)["steps"]}


def _machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated of " + ", ".join(MODELS))
    ap.add_argument("--write", action="store_true", help=f"replace the section '{SECTION}' of {RESULTS}")
    ap.add_argument("--worker", nargs=2, metavar=("STEP", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--measure", nargs=2, metavar=("STEP", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = measured("idle", "-")["peak_bytes"]
        print(f"baseline (imports only): {baseline / 2**20:.0f} MiB", flush=True)
        for name in args.models.split(","):
            model_dir = str(Path(tmp) / name)
            build(name, Path(model_dir))
            from e3prune.plan import model_shape

            params = model_shape(model_dir).params
            pred = predicted(model_dir)
            for step in STEP_NAMES:
                m = measured(step, model_dir)
                peak = m["peak_bytes"] - baseline
                err = (pred[step] - peak) / peak * 100
                rows.append({"model": name, "parameters": params, "step": step, "predicted_bytes": pred[step],
                             "measured_bytes": peak, "error_pct": round(err, 1), "seconds": round(m["seconds"], 1)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    table = render(rows, baseline)
    print(table)
    if args.write:
        write_section(table)


def render(rows: list[dict], baseline: int) -> str:
    lines = [
        SECTION,
        "",
        f"Measured on {_machine()}; baseline (a process importing the same modules) {baseline / 2**20:.0f} MiB, "
        f"subtracted. Batch {BATCH} × seq_len {SEQ_LEN}, {STEPS} batches per step, fp32, one process; "
        "random-weight Qwen3 models. Predicted: `e3prune plan --device cpu` (e3prune/plan.py), computed from "
        "config.json only. Measured: peak RSS of a fresh process running the step's code "
        "(`OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_model.py --write`).",
        "",
        "| model | parameters | step | predicted (MiB) | measured (MiB) | error | run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:,.1f} M | {r['step']} | {r['predicted_bytes'] / 2**20:,.0f} | "
            f"{r['measured_bytes'] / 2**20:,.0f} | {r['error_pct']:+.1f} % | {r['seconds']:.0f} |"
        )
    worst = max(abs(r["error_pct"]) for r in rows)
    lines += ["", f"Largest error: {worst:.1f} % (the bound asked for: ±25 %).", ""]
    return "\n".join(lines)


def write_section(table: str) -> None:
    """Replace this section of scale.md (or append it), leaving every other section as it is."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Scale\n\n"
    start = text.find(SECTION + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + table
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + table + ("" if nxt == -1 else text[nxt + 1 :])
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
