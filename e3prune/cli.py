"""``e3prune``: one subcommand per step. Each parses its arguments into the step's pydantic
config and calls the library; a user's mistake prints one ``error:`` line and exits 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from e3prune.errors import E3PruneError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer ids like 3,7,9, got {text!r}") from None


def _default_model() -> str:
    from e3prune.reference import MODEL_DIR

    return str(MODEL_DIR)


def cmd_inspect(args: argparse.Namespace) -> int:
    from e3prune.checkpoint import describe, load_config

    info = describe(load_config(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"{args.model}")
    print(f"  architecture    {', '.join(info['architectures'])} (model_type {info['model_type']})")
    print(f"  decoder layers  {info['num_hidden_layers']}, hidden size {info['hidden_size']}")
    print(f"  parameters      {p['total']:,} total: {p['decoder_layers']:,} in decoder layers, {p['outside_layers']:,} outside")
    per = info["parameters_per_layer"]
    if len(set(per)) == 1:
        print(f"  per layer       {per[0]:,} each")
    else:
        print("  per layer       " + ", ".join(f"{i}:{n:,}" for i, n in enumerate(per)))
    for name, value in info["per_layer_fields"].items():
        print(f"  {name:<15} {value}")
    print(f"  tied embeddings {info['tie_word_embeddings']}")
    return 0


def cmd_harden(args: argparse.Namespace) -> int:
    from e3prune.harden import HardenConfig, harden_checkpoint

    cfg = HardenConfig.parse(
        model=args.model,
        output=args.output,
        keep_layers=args.keep_layers,
        remove_layers=args.remove_layers,
        revision=args.revision,
        dtype=args.dtype,
        verify=not args.no_verify,
        overwrite=args.overwrite,
    )
    result = harden_checkpoint(cfg)
    v = result.verification
    print(f"kept {len(result.kept_layers)} layers {result.kept_layers}")
    print(f"removed {len(result.removed_layers)} layers {result.removed_layers}")
    if v is not None:
        print(f"verified: max |logit diff| {v.max_abs_logit_diff:.2e}, cached greedy tokens match: {v.greedy_tokens_match}")
    print(f"wrote {result.output}")
    return 0


def cmd_reference_build(args: argparse.Namespace) -> int:
    from e3prune.reference.build import ReferenceModelConfig, build_reference_model

    overrides = {"train_steps": args.train_steps} if args.train_steps else {}
    summary = build_reference_model(ReferenceModelConfig.parse(overrides), Path(args.output))
    print(f"held-out perplexity {summary['heldout_perplexity']:.2f}; wrote {args.output}")
    return 0


def cmd_reference_path(args: argparse.Namespace) -> int:
    print(_default_model())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e3prune", description="Layer pruning of causal LMs (E³-Pruner).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="layers, per-layer config fields and parameter counts of a model directory")
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped reference model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("harden", help="remove decoder layers and save a real, shallower checkpoint")
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped reference model)")
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--remove-layers", type=_int_list, help="layer ids to remove, e.g. 3,7,9")
    sel.add_argument("--keep-layers", type=_int_list, help="layer ids to keep")
    p.add_argument("--output", required=True, help="directory to write (must be new or empty, unless --overwrite)")
    p.add_argument("--revision", help="source revision to record in pruning.json")
    p.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16 or float16")
    p.add_argument("--no-verify", action="store_true", help="skip the logits / cached-generation check")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_harden)

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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "model", "unset") is None:
        args.model = _default_model()
    try:
        return args.func(args)
    except E3PruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
