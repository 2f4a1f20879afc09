"""How much eval text is also search or distill text? (docs/method.md, Stage 0, "Data that does not repeat")

Tokenizes ``builtin:reference-train`` (the reference model's training files less the near-copies
of held-out files) and, for comparison, all of the build's training files, with the reference
tokenizer; then reports the share of n-token windows of the held-out corpus, of the default eval
split and of ``heldout_tokens.safetensors`` that also occur in them.

    OMP_NUM_THREADS=1 python benchmarks/data_overlap.py     # writes results/data-overlap.{md,json}
"""

from __future__ import annotations

import gzip
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from e3prune.data import SampleConfig, load_split, sample_data
from e3prune.data_sources import builtin_corpus, reference_train_dataset
from e3prune.model_io import load_tokenizer
from e3prune.reference import MODEL_DIR
from e3prune.reference.build import encode_stream, train_documents

HERE = Path(__file__).resolve().parent
WINDOWS = (16, 32, 64)


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """The documents as the build tokenizes them (each followed by EOS), as a numpy array."""
    return encode_stream(tokenizer, texts).numpy()


def window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A polynomial hash of every n-token window (uint64 arithmetic, wrapping)."""
    w = np.lib.stride_tricks.sliding_window_view(ids, n)
    h = np.zeros(len(w), dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + w[:, j].astype(np.uint64)
    return h


def main() -> None:
    started = time.time()
    tokenizer = load_tokenizer(MODEL_DIR)
    dataset, _ = reference_train_dataset()
    corpora = {
        "builtin:reference-train": token_stream(tokenizer, list(dataset["text"])),
        "all the build's training files": token_stream(tokenizer, [d.text for d in train_documents()]),
    }
    with gzip.open(builtin_corpus(), "rt", encoding="utf-8") as fh:
        heldout = token_stream(tokenizer, [json.loads(line)["text"] for line in fh if line.strip()])
    with tempfile.TemporaryDirectory() as tmp:
        sample_data(SampleConfig(search_tokens=0, distill_tokens=0, output=f"{tmp}/data"))
        eval_split = load_split(f"{tmp}/data", "eval").numpy().reshape(-1)
    targets = {
        "held-out corpus (builtin:reference)": heldout,
        "default eval split": eval_split,
        "heldout_tokens.safetensors": load_file(str(MODEL_DIR / "heldout_tokens.safetensors"))["input_ids"]
        .numpy()
        .astype(np.int64),
    }
    rows = []
    for corpus, ids in corpora.items():
        for n in WINDOWS:
            known = np.unique(window_hashes(ids, n))
            for target, t in targets.items():
                share = float(np.isin(window_hashes(t, n), known).mean())
                rows.append(
                    {"corpus": corpus, "corpus_tokens": int(ids.size), "n": n, "target": target, "share": share}
                )
    record = {"rows": rows, "python": platform.python_version(), "seconds": round(time.time() - started, 1)}
    (HERE / "results" / "data-overlap.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# Eval text in the search and distill source",
        "",
        f"Python {record['python']}, reference tokenizer. Share of the target's n-token windows that also occur in the corpus.",
        "",
        "| corpus | tokens | n | " + " | ".join(targets) + " |",
        "|---|---|---|" + "---|" * len(targets),
    ]
    for corpus, ids in corpora.items():
        for n in WINDOWS:
            shares = [r["share"] for r in rows if r["corpus"] == corpus and r["n"] == n]
            lines.append(f"| {corpus} | {ids.size:,} | {n} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")
    lines += ["", "Command: `OMP_NUM_THREADS=1 python benchmarks/data_overlap.py`", ""]
    (HERE / "results" / "data-overlap.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
