"""The search keeps a layer whose removal is catastrophic, whatever its seed and its data sample.

A tiny 8-layer Qwen3 (the reference tokenizer) has one layer whose residual writes are scaled up
eightfold: the hidden state is mostly that layer's output, so skipping it destroys the output,
while RMSNorm makes the model almost blind to *small* changes of its gate around 1 (its
straight-through gradient is weak). That is the shape of the failure seen on an unseen trained
model, where θ of layer 0 sank to −5.4 and the search's final θ removed it (issue 13). Across 5
search seeds × 3 data samples, the final θ must rank that layer among the kept.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_qwen3_with_reference_tokenizer

from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.model_io import load_causal_lm
from e3prune.search import SearchConfig, search_mask
from e3prune.selection import Calibration, kl_importance
from e3prune.teacher import TeacherLogitsConfig, TeacherTopK, teacher_logits

SEQ = 32
LAYERS = 8
CATASTROPHIC = 0
SAMPLE_SEEDS = (0, 1, 2)
SEARCH_SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def catastrophic_lm(tmp_path_factory, reference_dir):
    d = tmp_path_factory.mktemp("catastrophic") / "model"
    return save_tiny_qwen3_with_reference_tokenizer(
        d, reference_dir, num_layers=LAYERS, embed_scale=4.0, layer_scales={CATASTROPHIC: 8.0}
    )


@pytest.fixture(scope="module")
def caches(catastrophic_lm, tmp_path_factory):
    """One teacher cache per data sample (sampler seeds 0, 1, 2 of the reference model's training files)."""
    out = {}
    for seed in SAMPLE_SEEDS:
        root = tmp_path_factory.mktemp(f"sample{seed}")
        sample_data(
            SampleConfig(
                sources=[SourceSpec(uri="builtin:reference-train")],
                tokenizer=str(catastrophic_lm),
                seq_len=SEQ,
                search_tokens=SEQ * (160 + 16),  # the search's budget once, plus 16 held-back sequences
                distill_tokens=0,
                eval_tokens=0,
                seed=seed,
                output=str(root / "data"),
            )
        )
        teacher_logits(
            TeacherLogitsConfig(
                model=str(catastrophic_lm), data=str(root / "data"), output=str(root / "cache"), splits=["search"]
            )
        )
        out[seed] = root / "cache"
    return out


def test_removing_the_scaled_layer_is_catastrophic(catastrophic_lm, caches):
    """The premise: skipping that layer raises the KL to the teacher by far more than skipping any other."""
    model = load_causal_lm(catastrophic_lm, "float32")
    for cache in caches.values():
        kl = kl_importance(model, Calibration.from_batch(TeacherTopK(str(cache)).load("search"), 32), 8)
        others = [v for layer, v in enumerate(kl) if layer != CATASTROPHIC]
        assert kl[CATASTROPHIC] > 20 * max(others), kl


@pytest.mark.slow
def test_search_never_ranks_the_catastrophic_layer_among_the_removed(catastrophic_lm, caches, tmp_path):
    """5 search seeds × 3 data samples, 40 % removed, default search settings at a small budget."""
    k = LAYERS - round(0.4 * LAYERS)
    for sample, cache in caches.items():
        for seed in SEARCH_SEEDS:
            res = search_mask(
                SearchConfig(
                    model=str(catastrophic_lm),
                    teacher_cache=str(cache),
                    output=str(tmp_path / f"s{sample}-{seed}"),
                    remove_ratio=0.4,
                    search_tokens=SEQ * 4 * 160,  # 160 steps: each training sequence read once
                    batch_size=4,
                    init_sequences=16,
                    final_sequences=16,
                    seed=seed,
                    selection_method="e3",
                )
            )
            theta = torch.tensor(res["theta"])
            rank = int((theta > theta[CATASTROPHIC]).sum())  # 0: the highest keep-logit
            assert rank < k, (
                f"sample {sample}, seed {seed}: θ ranks layer {CATASTROPHIC} {rank} of {LAYERS}: {res['theta']}"
            )
            assert CATASTROPHIC not in res["removed"], (sample, seed, res["removed"])
