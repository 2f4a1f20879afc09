"""GPU smoke run: every heavy step on CUDA against the same step on the CPU (docs/operations.md, GPU nodes).

On the shipped reference model, one machine with a GPU runs the run's steps twice, each leg in its
own process so that the CPU leg cannot see the GPU (``CUDA_VISIBLE_DEVICES=""``):

1. ``sample`` once (data is device-free);
2. ``teacher-logits`` (``device=cpu`` fp32 / ``device=cuda`` bf16): top-1 and top-K agreement of
   the two caches and the log-sum-exp difference;
3. ``search`` on each leg's own cache, same seed (the Gumbel noise comes from a CPU generator in
   both): the keep-sets are compared;
4. ``harden`` of the CPU leg's keep-set (GPU verification in fp32): the two checkpoints' tensors
   are compared;
5. ``distill`` of that student from the CPU leg's cache (same data on both legs): per-step losses,
   on CUDA in bf16 (the default, ``mixed_precision=auto``) and in fp32 (``mixed_precision=no``);
6. ``evaluate`` (held-out perplexity, KL, top-1 agreement, prefill/decode speed);
7. greedy decoding of the distilled checkpoint with transformers on each leg and, when vLLM is
   installed, with vLLM on the GPU: the tokens must equal transformers' (a serving engine that
   rejects or mis-reads the shallower checkpoint shows up here).

Writes ``benchmarks/results/gpu-smoke.md`` and ``.json`` with the machine it ran on. Exit status 1
when a check fails. ``--no-gpu-ok`` runs both legs on the CPU (a dry run of this script on a
machine without a GPU; nothing is written to results then).

    python benchmarks/gpu_smoke.py [--work DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPTS = 4  # eval sequences used as greedy prompts
PROMPT_TOKENS = 32
NEW_TOKENS = 32
# tolerances, CUDA against the CPU leg
TEACHER_TOP1_MIN = 0.97  # bf16 logits vs fp32: near-ties may flip
DISTILL_REL_BF16 = 0.03  # mean relative per-step loss difference, bf16 autocast vs fp32
DISTILL_REL_FP32 = 1e-3  # fp32 on the GPU vs fp32 on the CPU (different kernels, reduction orders)
PPL_REL = 0.02  # evaluate in bf16 on the GPU vs fp32 on the CPU
GREEDY_MIN = 0.9  # share of greedy tokens equal between legs (bf16 vs fp32 may diverge after a near-tie)


def leg(name: str, work: Path, args) -> None:
    """One leg's steps, in this process; writes ``work/name/leg.json``."""
    import torch

    from e3prune.distill import DistillConfig, distill
    from e3prune.evaluate import EvaluateConfig, evaluate
    from e3prune.harden import HardenConfig, harden_checkpoint
    from e3prune.reference import MODEL_DIR
    from e3prune.search import SearchConfig, search_mask
    from e3prune.teacher import TeacherLogitsConfig, teacher_logits

    device = "cuda" if name == "cuda" and not args.no_gpu_ok else "cpu"
    out, data, cpu = work / name, work / "data", work / "cpu"
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(step, fn):
        t0 = time.time()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds[step] = round(time.time() - t0, 2)
        return result

    timed(
        "teacher-logits",
        lambda: teacher_logits(
            TeacherLogitsConfig(data=str(data), output=str(out / "teacher"), device=device, overwrite=True)
        ),
    )

    def search(cache: Path, output: str) -> dict:
        return search_mask(
            SearchConfig(
                teacher_cache=str(cache), output=str(out / output), remove_ratio=0.25,
                search_tokens=args.search_tokens, device=device, overwrite=True, selection_method="e3",
            )
        )  # fmt: skip

    found = timed("search", lambda: search(out / "teacher", "search"))
    keep = json.loads((cpu / "search" / "search.json").read_text())["keep"]
    alternatives = {}
    if name == "cuda":  # separate the cache's numerics from the search's: search the CPU leg's cache too
        on_cpu_cache = timed("search (CPU leg's cache)", lambda: search(cpu / "teacher", "search-cpu-cache"))
        alternatives["keep_on_cpu_cache"] = on_cpu_cache["keep"]
        if found["keep"] != keep:  # how much the other set costs: held-out perplexity of each, same device
            harden_checkpoint(
                HardenConfig(
                    model=str(MODEL_DIR),
                    output=str(out / "pruned-own"),
                    keep_layers=found["keep"],
                    device=device,
                    overwrite=True,
                )
            )
            own = evaluate(
                EvaluateConfig(
                    pruned=str(out / "pruned-own"),
                    data=str(data),
                    device=device,
                    output=str(out / "eval-own"),
                    speed=False,
                    overwrite=True,
                )
            )
            alternatives["own_keep_pruned_perplexity"] = own["models"]["pruned"]["perplexity"]
    timed(
        "harden",
        lambda: harden_checkpoint(
            HardenConfig(
                model=str(MODEL_DIR),
                output=str(out / "pruned"),
                keep_layers=keep,
                method="e3_gumbel_topk",
                device=device,
                overwrite=True,
            )
        ),
    )
    precisions = {"student": "auto"} if device == "cpu" else {"student": "auto", "student-fp32": "no"}
    for student, precision in precisions.items():
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator setting per process otherwise
        timed(
            f"distill ({precision})",
            lambda: distill(
                DistillConfig(
                    student=str(out / "pruned"),
                    teacher_cache=str(cpu / "teacher"),
                    output=str(out / student),
                    distill_tokens=args.distill_tokens,
                    mixed_precision=precision,
                    overwrite=True,
                )
            ),
        )
    metrics = timed(
        "evaluate",
        lambda: evaluate(
            EvaluateConfig(
                pruned=str(out / "pruned"),
                student=str(out / "student"),
                data=str(data),
                device=device,
                output=str(out / "eval"),
                speed_repeats=3,
                overwrite=True,
            )
        ),
    )
    greedy = timed("greedy (transformers)", lambda: greedy_transformers(out / "student", data, device))
    record = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "keep": found["keep"],
        **alternatives,
        "seconds": seconds,
        "losses": {
            s: [json.loads(line)["loss"] for line in (out / s / "metrics.jsonl").read_text().splitlines()]
            for s in precisions
        },
        "metrics": {"models": metrics["models"], "comparisons": metrics["comparisons"], "speed": metrics["speed"]},
        "greedy": greedy,
        "vllm": greedy_vllm(out / "student", data) if device == "cuda" else None,
    }
    (out / "leg.json").write_text(json.dumps(record, indent=1))


def prompts(data: Path):
    from e3prune.data import load_split

    return load_split(str(data), "eval")[:PROMPTS, :PROMPT_TOKENS]


def greedy_transformers(model_dir: Path, data: Path, device: str) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    x = prompts(data).to(device)
    with torch.no_grad():
        y = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(x))
    return y[:, x.shape[1] :].tolist()


def greedy_vllm(model_dir: Path, data: Path) -> dict:
    """vLLM's greedy tokens from the same prompts, or why they were not produced."""
    if importlib.util.find_spec("vllm") is None:
        return {"ran": False, "reason": "vllm is not installed on this machine"}
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(data).tolist()], params)
    return {"ran": True, "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=False)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def compare_caches(a: Path, b: Path) -> dict:
    import torch

    from e3prune.teacher import TeacherTopK

    ca, cb = TeacherTopK(str(a)).load("search"), TeacherTopK(str(b)).load("search")
    assert torch.equal(ca["input_ids"], cb["input_ids"]), "the two caches hold different tokens"
    top1 = (ca["ids"][..., 0] == cb["ids"][..., 0]).float().mean().item()
    k = ca["ids"].shape[-1]
    overlap = (ca["ids"].unsqueeze(-1) == cb["ids"].unsqueeze(-2)).any(-1).float().sum(-1).mean().item() / k
    lse = (ca["lse"] - cb["lse"]).abs()
    return {
        "top1_agreement": top1,
        "topk_overlap": overlap,
        "lse_max_abs": lse.max().item(),
        "lse_mean_abs": lse.mean().item(),
    }


def compare_checkpoints(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    same = ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    config_same = json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    return {"tensors": len(ta), "identical": bool(same), "config_identical": config_same}


def rel_diff(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)]
    return {"steps": len(d), "mean_rel": sum(d) / len(d), "max_rel": max(d), "final": [a[-1], b[-1]]}


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node() or 'unknown'}: {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "gpu-smoke")
    ap.add_argument("--search-tokens", type=int, default=131072)
    ap.add_argument("--distill-tokens", type=int, default=131072)
    ap.add_argument("--leg", choices=["cpu", "cuda"], help=argparse.SUPPRESS)
    ap.add_argument("--no-gpu-ok", action="store_true", help="run the 'cuda' leg on the CPU (dry run)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--judge-again", type=Path, help="re-run the checks on a saved gpu-smoke.json")
    ap.add_argument(
        "--data",
        type=Path,
        help="sampled data to use instead of sampling here (e.g. on a GPU image "
        "without `datasets`: sample elsewhere with the same token budgets and carry it)",
    )
    args = ap.parse_args()
    if args.leg:
        leg(args.leg, args.work, args)
        return 0
    if args.judge_again:  # the checks of a saved run, re-evaluated (the measurements are that run's)
        r = json.loads(args.judge_again.read_text())
        meta = {k: r[k] for k in ("machine", "seconds", "args")}
        return report(judge(meta, r["cpu"], r["cuda"], r["cache"], r["checkpoint"]), args.results)

    import torch

    if not torch.cuda.is_available() and not args.no_gpu_ok:
        print("no CUDA GPU visible: nothing to compare (use --no-gpu-ok for a dry run on the CPU)", file=sys.stderr)
        return 2
    started = time.time()
    work = args.work
    if args.data:
        shutil.rmtree(work / "data", ignore_errors=True)
        shutil.copytree(args.data, work / "data")
    else:
        from e3prune.data import SampleConfig, SourceSpec, sample_data
        from e3prune.search import SearchConfig

        seq_len = SampleConfig.model_fields["seq_len"].default
        held_back = SearchConfig.model_fields["final_sequences"].default * seq_len  # the final selection's part
        sample_data(
            SampleConfig(
                sources=[SourceSpec(uri="builtin:reference")],
                search_tokens=args.search_tokens + held_back,
                distill_tokens=args.distill_tokens,
                eval_tokens=32768,
                output=str(work / "data"),
                overwrite=True,
            )
        )
    base = [
        sys.executable,
        __file__,
        "--work",
        str(work),
        "--search-tokens",
        str(args.search_tokens),
        "--distill-tokens",
        str(args.distill_tokens),
    ] + (["--no-gpu-ok"] if args.no_gpu_ok else [])
    for name in ("cpu", "cuda"):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        if name == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        print(f"== {name} leg", flush=True)
        subprocess.run([*base, "--leg", name], env=env, check=True)
    cpu, gpu = (json.loads((work / n / "leg.json").read_text()) for n in ("cpu", "cuda"))

    cache = compare_caches(work / "cpu" / "teacher", work / "cuda" / "teacher")
    ckpt = compare_checkpoints(work / "cpu" / "pruned", work / "cuda" / "pruned")
    meta = {
        "machine": machine(),
        "seconds": round(time.time() - started, 1),
        "args": {"search_tokens": args.search_tokens, "distill_tokens": args.distill_tokens},
    }
    return report(judge(meta, cpu, gpu, cache, ckpt), None if args.no_gpu_ok else args.results)


def judge(meta: dict, cpu: dict, gpu: dict, cache: dict, ckpt: dict) -> dict:
    """Every comparison and check from the two legs' records (also re-run on a saved result)."""
    bf16 = rel_diff(gpu["losses"]["student"], cpu["losses"]["student"])
    fp32 = (
        rel_diff(gpu["losses"]["student-fp32"], cpu["losses"]["student"]) if "student-fp32" in gpu["losses"] else None
    )
    ppl = {
        r: (gpu["metrics"]["models"][r]["perplexity"], cpu["metrics"]["models"][r]["perplexity"])
        for r in ("teacher", "pruned", "student")
    }
    greedy = agreement(gpu["greedy"], cpu["greedy"])
    vllm = gpu["vllm"] or {"ran": False, "reason": "dry run"}
    vllm_agree = agreement(vllm["tokens"], gpu["greedy"]) if vllm.get("ran") else None
    own_ppl = gpu.get("own_keep_pruned_perplexity")  # set only when the CUDA leg's own keep-set differs
    cpu_set_ppl = gpu["metrics"]["models"]["pruned"]["perplexity"]  # the CPU leg's set, evaluated on CUDA
    checks = {
        f"teacher cache: top-1 agreement ≥ {TEACHER_TOP1_MIN:.2f}": cache["top1_agreement"] >= TEACHER_TOP1_MIN,
        "search on the same (CPU) cache: same keep-set": gpu["keep_on_cpu_cache"] == cpu["keep"],
        "search on its own bf16 cache: same keep-set, or one no worse (pruned perplexity ≤ %g × the CPU set's)"
        % (1 + PPL_REL): own_ppl is None or own_ppl <= cpu_set_ppl * (1 + PPL_REL),
        "harden: identical tensors and config": ckpt["identical"] and ckpt["config_identical"],
        f"distill bf16: mean relative loss difference ≤ {DISTILL_REL_BF16:g}": bf16["mean_rel"] <= DISTILL_REL_BF16,
        f"evaluate: perplexities within {PPL_REL:g} relative": all(abs(g - c) / c <= PPL_REL for g, c in ppl.values()),
        f"greedy tokens (transformers) agree ≥ {GREEDY_MIN:.2f}": greedy >= GREEDY_MIN,
    }
    if fp32 is not None:
        checks[f"distill fp32: mean relative loss difference ≤ {DISTILL_REL_FP32:g}"] = (
            fp32["mean_rel"] <= DISTILL_REL_FP32
        )
    if vllm_agree is not None:
        checks["vLLM greedy tokens equal transformers' (bf16, same GPU)"] = vllm_agree == 1.0
    return {
        **meta,
        "cpu": cpu,
        "cuda": gpu,
        "cache": cache,
        "checkpoint": ckpt,
        "distill_bf16": bf16,
        "distill_fp32": fp32,
        "perplexity": ppl,
        "greedy_agreement": greedy,
        "vllm": {**vllm, "agreement": vllm_agree},
        "checks": checks,
    }


def report(result: dict, results: Path | None) -> int:
    md = render(result)
    print(md)
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        (results / "gpu-smoke.json").write_text(json.dumps(result, indent=1))
        (results / "gpu-smoke.md").write_text(md)
    return 0 if all(result["checks"].values()) else 1


def render(r: dict) -> str:
    cpu, gpu = r["cpu"], r["cuda"]
    lines = [
        "# GPU smoke run: every step on CUDA against the CPU",
        "",
        f"Machine: {r['machine']}. Command: `python benchmarks/gpu_smoke.py` "
        f"(search {r['args']['search_tokens']:,} tokens, distill {r['args']['distill_tokens']:,} tokens, "
        f"reference model, 25 % removed); {r['seconds']:.0f} s in all.",
        "",
        "| check | result |",
        "| --- | --- |",
        *[f"| {name} | {'pass' if ok else '**FAIL**'} |" for name, ok in r["checks"].items()],
        "",
        "## Per step",
        "",
        "| step | CPU (fp32) s | CUDA s |",
        "| --- | ---: | ---: |",
        *[f"| {s} | {cpu['seconds'].get(s, float('nan')):.2f} | {gpu['seconds'][s]:.2f} |" for s in gpu["seconds"]],
        "",
        f"- Teacher cache (search split), CUDA bf16 vs CPU fp32: top-1 agreement {r['cache']['top1_agreement']:.4f}, "
        f"top-K overlap {r['cache']['topk_overlap']:.4f}, |lse| difference mean {r['cache']['lse_mean_abs']:.4f}, "
        f"max {r['cache']['lse_max_abs']:.4f}.",
        f"- Search keep-set: CPU {cpu['keep']}, CUDA on its own cache {gpu['keep']}, CUDA on the CPU leg's cache "
        f"{gpu.get('keep_on_cpu_cache')}."
        + (
            f" Held-out perplexity of the pruned model (CUDA): CPU's set {r['perplexity']['pruned'][0]:.3f}, "
            f"CUDA's set {gpu['own_keep_pruned_perplexity']:.3f}."
            if gpu.get("own_keep_pruned_perplexity")
            else ""
        ),
        f"- Harden: {r['checkpoint']['tensors']} tensors, identical: {r['checkpoint']['identical']}.",
        f"- Distill, {r['distill_bf16']['steps']} steps, CUDA bf16 vs CPU fp32: mean relative loss difference "
        f"{r['distill_bf16']['mean_rel']:.2e} (max {r['distill_bf16']['max_rel']:.2e}); final loss "
        f"{r['distill_bf16']['final'][0]:.4f} vs {r['distill_bf16']['final'][1]:.4f}.",
    ]
    if r["distill_fp32"]:
        f = r["distill_fp32"]
        lines.append(
            f"- Distill, CUDA fp32 vs CPU fp32: mean relative loss difference {f['mean_rel']:.2e} "
            f"(max {f['max_rel']:.2e}); final loss {f['final'][0]:.4f} vs {f['final'][1]:.4f}."
        )
    lines.append(
        "- Held-out perplexity, CUDA vs CPU: "
        + ", ".join(f"{role} {g:.3f} vs {c:.3f}" for role, (g, c) in r["perplexity"].items())
        + "."
    )
    sp = gpu["metrics"]["speed"]
    if sp:
        lines.append(
            f"- Speed on CUDA ({sp['dtype']}): student speedup prefill {sp['speedup']['student']['prefill']:.2f}×, "
            f"decode {sp['speedup']['student']['decode']:.2f}× (reliable: {sp['reliable']})."
        )
    lines.append(
        f"- Greedy decoding ({PROMPTS} prompts × {NEW_TOKENS} tokens), transformers on CUDA bf16 vs CPU fp32: "
        f"{r['greedy_agreement']:.3f} of tokens equal."
    )
    v = r["vllm"]
    lines.append(
        f"- vLLM: {'greedy tokens equal to transformers: {:.3f}'.format(v['agreement']) if v.get('ran') else 'not run (' + v['reason'] + ')'}."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
