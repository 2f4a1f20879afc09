"""``e3prune``: one subcommand per step. Each parses its arguments into the step's pydantic
config and calls the library; a user's mistake prints one ``error:`` line and exits 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from e3prune.errors import E3PruneError
from e3prune.reference import default_model


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer ids like 3,7,9, got {text!r}") from None


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of a step's pydantic config, so the CLI never drifts from it.

    Flags default to ``None`` (= the config's own default); lists are comma-separated; booleans
    get ``--x`` / ``--no-x``; Literal fields get their choices; ``%`` in help is escaped for
    argparse. Validation stays in the config.
    """
    for name, field in config_cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
            ann = args[0]
        help_text = field.description or ""
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            help_text += f" (default: {default})" if default not in (None, "") else ""
        help_text = help_text.replace("%", "%%")  # argparse %-formats help (e.g. %(default)s)
        kwargs: dict = {"dest": name, "default": None, "help": help_text, "required": field.is_required()}
        origin = typing.get_origin(ann)
        if ann is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif origin is list:
            (item,) = typing.get_args(ann) or (str,)
            conv = _int_list if item is int else (lambda text: [x for x in text.split(",") if x])
            parser.add_argument(flag, type=conv, **kwargs)
        elif origin is typing.Literal:
            parser.add_argument(flag, choices=[str(c) for c in typing.get_args(ann)], **kwargs)
        elif ann in (int, float, str):
            parser.add_argument(flag, type=ann, **kwargs)


def config_from_flags(config_cls, args: argparse.Namespace):
    """The step's config from the flags that were given (others keep the config's defaults)."""
    given = {k: v for k, v in vars(args).items() if k in config_cls.model_fields and v is not None}
    return config_cls.parse(given)


def cmd_teacher_logits(args: argparse.Namespace) -> int:
    from e3prune.teacher import TeacherLogitsConfig, teacher_logits

    manifest = teacher_logits(config_from_flags(TeacherLogitsConfig, args))
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens at {info['tokens_per_second']:,.0f} tokens/s")
    print(f"top-{manifest['top_k']} cache, {manifest['bytes_per_token']['logits']} bytes a token; wrote {args.output}")
    return 0


def cmd_join_teacher_cache(args: argparse.Namespace) -> int:
    from e3prune.teacher import join_teacher_cache

    manifest = join_teacher_cache(args.parts, args.output, overwrite=args.overwrite, copy_files=args.copy_files)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['sequences']:,} sequences in {len(info['shards'])} files")
    print(f"joined {len(args.parts)} parts into {args.output}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from e3prune.search import SearchConfig, search_mask

    result = search_mask(config_from_flags(SearchConfig, args))
    print(f"keep {len(result['keep'])} layers {result['keep']}")
    print(f"remove {len(result['removed'])} layers {result['removed']} (chosen from: {result['chosen_from']})")
    print(f"{result['steps']} steps, {result['search_tokens']:,} tokens, {result['seconds']:.1f}s; wrote {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from e3prune.evaluate import EvaluateConfig, evaluate
    from e3prune.report import summary_markdown

    print(summary_markdown(evaluate(config_from_flags(EvaluateConfig, args))), end="")
    print(f"wrote {args.output}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from e3prune.distill import DistillConfig
    from e3prune.launch import launch_distill

    # --processes / --nodes start the processes (e3prune.launch); under `accelerate launch` this is one of them.
    summary = launch_distill(config_from_flags(DistillConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch` every process runs this
        final = summary["final"]
        print(
            f"{summary['steps']} steps, {summary['tokens']:,} tokens ({summary['loss']}), "
            f"{summary['tokens_per_second']:,.0f} tokens/s; final loss {final['loss']:.4f} kl {final['kl']:.4f}"
        )
        if summary["resumed_from_step"]:
            print(f"resumed from step {summary['resumed_from_step']}")
        print(f"wrote {args.output}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from e3prune.selection import SelectConfig, select_layers

    sel = select_layers(config_from_flags(SelectConfig, args))
    print(f"{sel.method}: remove {sel.removed}, keep {sel.keep} ({sel.seconds:.1f}s); wrote {args.output}")
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    from e3prune.config_docs import readme_with_table, render

    if not args.write:
        print(render(), end="")
        return 0
    docs, readme = Path("docs/configuration.md"), Path("README.md")
    if not docs.parent.is_dir() or not readme.is_file():
        raise E3PruneError("run it from the repository root (it has README.md and docs/)", field="write")
    docs.write_text(render())
    readme.write_text(readme_with_table(readme.read_text()))
    print(f"wrote {docs} and the pipeline parameters in {readme}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from e3prune.model_io import describe, load_config

    info = describe(load_config(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"{args.model}")
    print(f"  architecture    {', '.join(info['architectures'])} (model_type {info['model_type']})")
    print(f"  decoder layers  {info['num_hidden_layers']}, hidden size {info['hidden_size']}")
    print(
        f"  parameters      {p['total']:,} total: {p['decoder_layers']:,} in decoder layers, {p['outside_layers']:,} outside"
    )
    per = info["parameters_per_layer"]
    if len(set(per)) == 1:
        print(f"  per layer       {per[0]:,} each")
    else:
        print("  per layer       " + ", ".join(f"{i}:{n:,}" for i, n in enumerate(per)))
    for name, value in info["per_layer_fields"].items():
        print(f"  {name:<15} {value}")
    print(f"  tied embeddings {info['tie_word_embeddings']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from e3prune.plan import PlanConfig, plan, render

    result = plan(config_from_flags(PlanConfig, args))
    print(json.dumps(result, indent=2) if args.json else render(result), end="\n" if args.json else "")
    return 0


def cmd_harden(args: argparse.Namespace) -> int:
    from e3prune.harden import HardenConfig, harden_checkpoint

    result = harden_checkpoint(config_from_flags(HardenConfig, args))
    v = result.verification
    print(f"kept {len(result.kept_layers)} layers {result.kept_layers}")
    print(f"removed {len(result.removed_layers)} layers {result.removed_layers}")
    if v is not None:
        print(
            f"verified: max |logit diff| {v.max_abs_logit_diff:.2e}, cached greedy tokens match: {v.greedy_tokens_match}"
        )
    print(f"wrote {result.output}")
    return 0


def _source_arg(text: str) -> dict[str, object]:
    """``URI[:weight]``; the weight is taken only when what follows the last colon is a number,
    so ``builtin:reference`` and ``s3://…`` keep their colons."""
    uri, sep, tail = text.rpartition(":")
    if sep and uri:
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            return {"uri": uri, "weight": weight}
    return {"uri": text}


def cmd_sample(args: argparse.Namespace) -> int:
    from e3prune.data import SPLITS, SampleConfig, sample_data

    settings: dict[str, object] = {
        k: v for k, v in vars(args).items() if k in SampleConfig.model_fields and k != "sources" and v is not None
    }
    if args.source:
        per_source = {"text_field": args.text_field, "messages_field": args.messages_field, "split": args.split}
        per_source = {k: v for k, v in per_source.items() if v is not None}
        settings["sources"] = [{**src, **per_source} for src in args.source]
    elif args.text_field or args.messages_field or args.split:
        raise E3PruneError("--text-field, --messages-field and --split apply to --source; give one", field="sources")
    cfg = SampleConfig.parse(settings)
    manifest = sample_data(cfg)
    for split in SPLITS:
        info = manifest["splits"][split]
        repeated = ", documents repeated" if info["repeated"] else ""
        print(
            f"{split:<8} {info['tokens']:>12,} tokens  {info['sequences']:>7,} × {manifest['seq_len']}  "
            f"{info['documents']:>6,} documents{repeated}"
        )
    print(f"wrote {cfg.output}")
    return 0


def cmd_reference_build(args: argparse.Namespace) -> int:
    from e3prune.reference.build import ReferenceModelConfig, build_reference_model

    overrides = {"train_steps": args.train_steps} if args.train_steps else {}
    summary = build_reference_model(ReferenceModelConfig.parse(overrides), Path(args.output))
    print(f"held-out perplexity {summary['heldout_perplexity']:.2f}; wrote {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from e3prune.run_config import RunConfig
    from e3prune_pipelines.local_run import run_local  # imports kfp: only when asked

    params = {k: v for k, v in vars(args).items() if k in RunConfig.model_fields and v is not None}
    print(f"e3-pruner: running the pipeline locally (kfp.local) into {Path(args.output).resolve()}", flush=True)
    for warning in RunConfig.parse(params).repeat_warnings():
        print(f"warning: {warning}", flush=True)
    result = run_local(params, args.output)
    print()
    print(result["summary"])
    print(f"Finished in {result['seconds'] / 60:.1f} min.")
    print(f"- step outputs (KFP): {result['kfp_outputs']}")
    print(f"- data and models:    {result['storage_prefix']}")
    print(
        f"- MLflow:             {result['tracking_uri']}  (browse: mlflow ui --backend-store-uri {result['tracking_uri']})"
    )
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from e3prune_pipelines.compile import run  # imports kfp: only when asked

    return run(args)


def cmd_reference_path(args: argparse.Namespace) -> int:
    print(default_model())
    return 0


PROMOTE_REJECTED_EXIT = 3  # distinct from 2 (a user error), so a pipeline can tell "rejected" from "broken"


def _metric_minimum(text: str) -> tuple[str, float]:
    key, sep, value = text.rpartition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected METRIC=MINIMUM like lm_eval.task.student.acc=0.4, got {text!r}"
        ) from None


def cmd_register(args: argparse.Namespace) -> int:
    from e3prune.registration import register_run

    result = register_run(
        run_config=args.run_config,
        search=args.search,
        distilled=args.distilled,
        evaluation=args.evaluation,
        exported=args.exported,
        run_key=args.run_key,
        run_name=args.run_name,
        tracking_uri=args.mlflow_tracking_uri,
    )
    print(result["summary_markdown"], end="")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from e3prune.gate import PromoteConfig, promote

    args.lm_eval_min = dict(args.lm_eval_min) if args.lm_eval_min else None
    result = promote(config_from_flags(PromoteConfig, args))
    print(result["summary_markdown"], end="")
    return 0 if result["promoted"] else PROMOTE_REJECTED_EXIT


def cmd_rollback(args: argparse.Namespace) -> int:
    from e3prune.gate import rollback

    result = rollback(args.model_name, tracking_uri=args.tracking_uri)
    print(f"{result['model_name']}: champion is version {result['champion']} again (was {result['rolled_back']})")
    return 0


def _param_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like source=hf:Qwen/Qwen3-8B, got {text!r}")
    return key.strip(), value


def _kfp_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The flags shared by ``submit`` and ``schedule``, as overrides of the YAML file's keys."""
    return {
        "host": args.host,
        "namespace": args.namespace,
        "experiment": args.experiment,
        "pipeline_name": args.pipeline_name,
        "pipeline_version": args.pipeline_version,
        "package": args.package,
        "parameters": dict(args.param) if args.param else None,
    }


def cmd_submit(args: argparse.Namespace) -> int:
    from e3prune_pipelines.submit import SubmitConfig, submit  # imports kfp: only when asked

    cfg = SubmitConfig.from_yaml(args.config, **_kfp_overrides(args), run_name=args.name)
    out = submit(cfg)
    print(f"{out['upload']} (pipeline {out['pipeline_id']}, version {out['pipeline_version_id']})")
    print(f"started run {out['run_name']!r} {out['run_id']} in experiment {cfg.experiment!r} ({out['experiment_id']})")
    print(out["run_url"])
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from e3prune_pipelines.submit import ScheduleConfig, schedule  # imports kfp: only when asked

    cfg = ScheduleConfig.from_yaml(
        args.config,
        **_kfp_overrides(args),
        name=args.name,
        cron=args.cron,
        max_concurrency=args.max_concurrency,
        catchup=args.catchup,
        enabled=args.enabled,
    )
    out = schedule(cfg)
    print(f"{out['upload']} (pipeline {out['pipeline_id']}, version {out['pipeline_version_id']})")
    for old in out["replaced"]:
        print(f"replaced existing recurring run {old} (KFP cannot update one; deleted it)")
    print(
        f"created recurring run {cfg.name!r} {out['recurring_run_id']} in experiment {cfg.experiment!r}: "
        f"cron '{out['cron']}', max concurrency {cfg.max_concurrency}, catchup {'on' if cfg.catchup else 'off'}, "
        f"{'enabled' if cfg.enabled else 'disabled'}"
    )
    print(out["recurring_run_url"])
    return 0


def add_kfp_commands(sub) -> None:
    """``submit`` and ``schedule``: a YAML file (docs/operations.md) with its main keys as flags."""
    for name, help_text in (
        ("submit", "upload the compiled pipeline (or a new version) to Kubeflow Pipelines and start a run"),
        ("schedule", "upload the pipeline and create its recurring run, replacing one of the same name"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", metavar="FILE.yaml", help="settings file (docs/operations.md); flags override it")
        p.add_argument("--host", help="KFP API URL (default: KF_PIPELINES_ENDPOINT)")
        p.add_argument("--namespace", help="profile namespace on multi-user Kubeflow")
        p.add_argument("--experiment", help="experiment name (default: e3-pruner)")
        p.add_argument("--pipeline-name", help="pipeline name in KFP (default: e3-pruner)")
        p.add_argument("--pipeline-version", help="version name (default: e3-pruner version + package hash)")
        p.add_argument("--package", help="compiled pipeline YAML (default: the shipped one)")
        p.add_argument(
            "--param", action="append", type=_param_arg, metavar="KEY=VALUE", help="pipeline parameter; repeatable"
        )
        if name == "submit":
            p.add_argument("--name", help="run name (default: pipeline name + UTC time)")
            p.set_defaults(func=cmd_submit)
        else:
            p.add_argument("--name", help="recurring run name (default: e3-pruner); one of that name is replaced")
            p.add_argument("--cron", help="'m h dom mon dow', six fields with seconds first, or @daily / @every 6h")
            p.add_argument("--max-concurrency", type=int, help="runs at once, 1-10 (default: 1)")
            p.add_argument("--catchup", action=argparse.BooleanOptionalAction, help="run missed slots (default: no)")
            p.add_argument("--enabled", action=argparse.BooleanOptionalAction, help="(default: enabled)")
            p.set_defaults(func=cmd_schedule)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e3prune", description="Layer pruning of causal LMs (E³-Pruner).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="layers, per-layer config fields and parameter counts of a model directory")
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped reference model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    from e3prune.plan import PlanConfig

    p = sub.add_parser(
        "plan", help="memory per GPU, GPUs or nodes and estimated time of every step, from config.json alone"
    )
    p.add_argument("model", help="a model directory with config.json, or a config.json file (no weights are read)")
    add_config_flags(p, PlanConfig, skip=("model",))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    from e3prune.harden import HardenConfig

    p = sub.add_parser("harden", help="remove decoder layers and save a real, shallower checkpoint")
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped reference model)")
    add_config_flags(p, HardenConfig, skip=("model", "metadata"))  # metadata: a library-only dict
    p.set_defaults(func=cmd_harden)

    from e3prune.data import SampleConfig
    from e3prune.distill import DistillConfig
    from e3prune.evaluate import EvaluateConfig
    from e3prune.search import SearchConfig
    from e3prune.selection import SelectConfig
    from e3prune.teacher import TeacherLogitsConfig

    p = sub.add_parser("teacher-logits", help="cache the teacher's top-K logits over the sampled splits")
    add_config_flags(p, TeacherLogitsConfig)
    p.set_defaults(func=cmd_teacher_logits)
    p = sub.add_parser(
        "join-teacher-cache", help="one teacher cache from the parts of a pass that fanned out (--shards N)"
    )
    p.add_argument("parts", nargs="+", help="the parts' outputs (directories or s3:// URIs), tasks 0..N-1 in order")
    p.add_argument("--output", required=True, help="where the joined manifest goes (directory or s3:// URI)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--copy-files", action="store_true", help="copy the parts' files below the output instead of referencing them"
    )
    p.set_defaults(func=cmd_join_teacher_cache)
    p = sub.add_parser("search", help="Gumbel-TopK search for the layers to remove (E³, weights frozen)")
    add_config_flags(p, SearchConfig)
    p.set_defaults(func=cmd_search)
    p = sub.add_parser(
        "evaluate", help="held-out perplexity, agreement with the teacher, speed and lm-eval tasks of pruned models"
    )
    add_config_flags(p, EvaluateConfig)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser(
        "distill",
        help="entropy-aware top-K distillation of the hardened student (one process per GPU, or --processes N)",
    )
    add_config_flags(p, DistillConfig)
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("select", help="choose the layers with a baseline (last, random, ShortGPT, angular, SLEB, ...)")
    add_config_flags(p, SelectConfig)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("sample", help="sample search / distill / eval token splits from a mixture of data sources")
    p.add_argument(
        "--source",
        action="append",
        type=_source_arg,
        metavar="URI[:WEIGHT]",
        help="builtin:reference, builtin:reference-train, a local jsonl/json/parquet/txt file or directory, or a "
        "hub dataset id; repeat for a mixture (every source feeds every split). Default: eval from "
        "builtin:reference, search and distill from builtin:reference-train",
    )
    p.add_argument("--text-field", help="field holding the text, for every --source (default: text)")
    p.add_argument("--messages-field", help="field holding chat messages, rendered with the chat template")
    p.add_argument("--split", help="split of hub datasets (default: train)")
    add_config_flags(p, SampleConfig, skip=("sources",))
    p.set_defaults(func=cmd_sample)

    from e3prune.run_config import RunConfig

    p = sub.add_parser(
        "run",
        help="run the whole pipeline locally with kfp.local (default: the shipped model, about 7-8 min on 2 cores)",
    )
    p.add_argument("--output", default="runs/e3-pruner", help="directory for KFP outputs, data, models and MLflow")
    add_config_flags(p, RunConfig)
    p.set_defaults(func=cmd_run)
    from e3prune_pipelines.compile import add_arguments as compile_arguments  # no kfp at import

    p = sub.add_parser("compile", help="compile the pipelines (CPU and GPU) and components to their committed YAML")
    compile_arguments(p)
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("register", help="log a pipeline run's step outputs to MLflow and register its model")
    p.add_argument("--run-config", required=True, help="run_config.json of detect-release")
    steps = {"search": "search", "distilled": "distill", "evaluation": "evaluate", "exported": "export"}
    for flag, step in steps.items():
        p.add_argument(f"--{flag}", required=True, help=f"output of {step}: a directory or s3://bucket/prefix")
    p.add_argument("--run-key", required=True, help="unique id of the pipeline run: a rerun reuses its run and version")
    p.add_argument("--run-name", default="", help="MLflow run name (default: the run key)")
    p.add_argument("--mlflow-tracking-uri", help="MLflow tracking URI (default: the run's, else MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_register)
    from e3prune.gate import PromoteConfig

    p = sub.add_parser(
        "promote",
        help="quality gate for a registered version; it becomes 'champion' only if it passes (exit 3 if rejected)",
    )
    add_config_flags(p, PromoteConfig, skip=("lm_eval_min",))
    p.add_argument(
        "--lm-eval-min",
        action="append",
        type=_metric_minimum,
        metavar="METRIC=MINIMUM",
        help="minimum of a metric tag, e.g. lm_eval.python_stdlib_cloze.student.acc=0.4; repeat for more",
    )
    p.set_defaults(func=cmd_promote)
    p = sub.add_parser("rollback", help="give the 'champion' alias back to the previous champion")
    p.add_argument("--model-name", required=True, help="registered model name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_rollback)
    add_kfp_commands(sub)
    p = sub.add_parser("config-docs", help="print the configuration reference (docs/configuration.md)")
    p.add_argument("--write", action="store_true", help="rewrite docs/configuration.md and README.md's parameter table")
    p.set_defaults(func=cmd_config_docs)

    ref = sub.add_parser("reference-model", help="the small model the project ships and trains itself")
    rsub = ref.add_subparsers(dest="action", required=True)
    p = rsub.add_parser("build", help="train the tokenizer and model on the standard library (~30 min on 2 cores)")
    p.add_argument("--output", required=True, help="new directory to write")
    p.add_argument("--train-steps", type=int, help="override the number of training steps (for a quick try)")
    p.set_defaults(func=cmd_reference_build)
    p = rsub.add_parser("path", help="print the directory of the shipped reference model")
    p.set_defaults(func=cmd_reference_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "model", "unset") is None and args.command in ("inspect", "harden"):
        args.model = default_model()
    try:
        return args.func(args)
    except E3PruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
