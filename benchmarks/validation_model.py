"""The second, independent validation model: used only to check claims, never to tune.

A Llama-layout causal LM (untied embeddings, no q/k norm), 20 layers and a wider MLP than the
shipped Qwen3 model, its own seed and its own train/held-out split of the standard library (another
path-hash salt), with every training file that is a near-copy of a held-out file left out, so its
held-out text is not seen text. Built on first use by the project's own build
(``e3prune reference-model build`` with the settings below) and cached in ``benchmarks/.cache``,
like the 12-layer variant; about 25 minutes on 2 CPU threads.

Its data sources: ``heldout_corpus.jsonl.gz`` (eval) and ``train_corpus.jsonl.gz`` (search and
distill), both written by the build next to the checkpoint.

    python benchmarks/validation_model.py          # build (or show) the cached model
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
CACHE = HERE / ".cache"
NAME = "validation-llama20"
SETTINGS = {
    "architecture": "llama",
    "num_layers": 20,
    "intermediate_size": 448,
    "learning_rate": 1e-3,  # 3e-3 (the Qwen3 model's) diverged by step 100: no q/k norm here
    "seed": 1,
    "split_salt": "validation",
    "exclude_near_copies": True,
    "threads": 2,
    "log_every_steps": 25,
}


def validation_model() -> Path:
    """Path of the cached validation model, built first if missing."""
    from e3prune.reference.build import ReferenceModelConfig, build_reference_model

    path = CACHE / NAME
    if not (path / "model.safetensors").is_file():
        partial = CACHE / (NAME + ".partial")
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        build_reference_model(ReferenceModelConfig(**SETTINGS), partial)
        partial.rename(path)
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = validation_model()
    s = json.loads((p / "training_log.json").read_text())
    print(p, s["parameters"], "params; held-out ppl", round(s["heldout_perplexity"], 2), s["corpus"])
