"""The keep-set by another selector than E³, or the better of E³ and SLEB (``selection_method``).

``search_mask`` hands over here when ``SearchConfig.selection_method`` is not ``e3``:

- a baseline (``sleb``, ``block_influence``, ``angular``, ``kl_oneshot``, ``last``, ``random``):
  the selector of :mod:`e3prune.selection` on the first ``calibration_sequences`` of the search
  split, as ``e3prune select`` runs it;
- ``best``: the E³ search and SLEB both run on the training part of the search split, and the set
  with the lower KL to the teacher on its *held-back* part wins: the last ``final_sequences``
  sequences (``e3prune.search.split_search_data``), which neither selector trained on, the very
  sequences that chose E³'s own set among its candidates, so SLEB's set is in effect one more
  candidate (docs/method.md, "Choosing between selectors").

Either way the output is the ``search.json`` every later step reads (keep, removed, the
candidates with their scores, and the cost), so harden, register and the pipeline do not change.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from e3prune import storage
from e3prune.selection import Calibration, Meter, SelectConfig, masked_loss, select_layers

if TYPE_CHECKING:
    from e3prune.search import SearchConfig

CALIBRATION_SEQUENCES = 16  # what SLEB and the other baselines read of the search split (benchmarks/selection.py)
BEST_OF = ("e3", "sleb")
TRAJECTORY = "trajectory.jsonl"


def choose_layers(cfg: SearchConfig) -> dict[str, Any]:
    """The step for ``selection_method`` other than ``e3``: returns and writes ``search.json``."""
    started = time.time()
    trajectory = None  # E³'s θ per step, kept beside the result when E³ ran (best)
    if cfg.selection_method == "best":
        result = _best(cfg)
        trajectory = storage.read_file(f"{cfg.output}.e3", TRAJECTORY, field="output")
    else:
        result = _baseline(cfg, cfg.selection_method, cfg.output)
    result["search_seconds"] = round(time.time() - started, 2)
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        (out / "search.json").write_text(json.dumps(result, indent=1) + "\n")
        if trajectory is not None:
            (out / TRAJECTORY).write_bytes(trajectory)
    return result


def _baseline(cfg: SearchConfig, method: str, output: str, held_back: int = 0) -> dict[str, Any]:
    """A baseline selector, its result in search.json's form (no θ, no trajectory). With ``held_back``
    it reads only the split's sequences before the last ``held_back`` (``best``)."""
    from e3prune.model_io import load_config
    from e3prune.teacher import TeacherTopK

    n_train = TeacherTopK(cfg.teacher_cache).sequences("search") - held_back
    select = SelectConfig.parse(
        model=cfg.model, teacher_cache=cfg.teacher_cache, output=f"{output}.{method}", method=method,
        remove_ratio=cfg.remove_ratio, calibration_sequences=max(1, min(CALIBRATION_SEQUENCES, n_train)),
        batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, overwrite=True,
    )  # fmt: skip
    sel = select_layers(select)
    L = load_config(cfg.model).num_hidden_layers
    tokens = sel.layer_tokens // max(1, L)
    return {
        "selection_method": method, "keep": sel.keep, "removed": sel.removed, "num_hidden_layers": L,
        "chosen_from": method, "candidates": [{"source": method, "keep": sel.keep}], "steps": 0,
        "search_tokens": tokens, "layer_tokens": sel.layer_tokens,
        "tokens_per_second": round(tokens / max(sel.seconds, 1e-9), 1),
    }  # fmt: skip


def _best(cfg: SearchConfig) -> dict[str, Any]:
    """E³ and SLEB, scored on held-back data; the lower KL to the teacher wins."""
    from e3prune.search import search_mask

    e3 = search_mask(cfg.model_copy(update={"selection_method": "e3", "output": f"{cfg.output}.e3"}))
    held_back = _held_back(cfg)
    sleb = _baseline(cfg, "sleb", cfg.output, held_back["input_ids"].size(0))
    scores = _held_back_kl(cfg, held_back, {"e3": e3["keep"], "sleb": sleb["keep"]})
    winner = min(BEST_OF, key=lambda m: (scores[m], BEST_OF.index(m)))  # a tie keeps E³
    chosen = {"e3": e3, "sleb": sleb}[winner]
    candidates = [{"source": m, "keep": r["keep"], "held_back_kl": scores[m]} for m, r in (("e3", e3), ("sleb", sleb))]
    return {
        **{k: v for k, v in e3.items() if k not in ("keep", "removed", "chosen_from", "candidates")},
        "selection_method": "best", "keep": chosen["keep"], "removed": chosen["removed"],
        "chosen_from": f"best of E³ and SLEB on held-back data: {winner}", "candidates": candidates,
        "search_tokens": e3["search_tokens"] + sleb["search_tokens"],
    }  # fmt: skip


def _held_back(cfg: SearchConfig) -> dict[str, Any]:
    """The held-back part of the search split, as the search holds it back (with its final selection on)."""
    from e3prune.search import split_search_data
    from e3prune.teacher import TeacherTopK

    return split_search_data(
        TeacherTopK(cfg.teacher_cache).load("search"), cfg.model_copy(update={"final_selection": True})
    )[1]


def _held_back_kl(cfg: SearchConfig, held_back: dict[str, Any], keep_sets: dict[str, list[int]]) -> dict[str, float]:
    """KL to the teacher's top-K of each keep-set on the held-back part of the search split."""
    from e3prune.placement import load_placed

    calib = Calibration.from_batch(held_back)
    model, _ = load_placed(cfg.model, cfg.device)  # masked_loss moves each batch to the model
    meter = Meter()
    return {m: round(masked_loss(model, calib, keep, "kl", cfg.batch_size, meter), 6) for m, keep in keep_sets.items()}
