"""Held-back final selection never scores sequences the search trained on (docs/method.md, "Final selection").

Every forward's token ids are recorded (at the embedding) with the phase that ran it: the KL
initialisation, the training steps, the final scoring of the candidates, and for
``selection_method: best`` SLEB and the comparison of E³ with SLEB. Each recorded row is mapped
back to its index in the search split.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import save_tiny_qwen3_with_reference_tokenizer

import e3prune.choose as choose
import e3prune.search as search
from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.errors import E3PruneError
from e3prune.search import SearchConfig, held_back_sequences, search_mask
from e3prune.teacher import TeacherLogitsConfig, TeacherTopK, teacher_logits

SEQ = 32
SPLIT = 40  # sequences in the search split
FINAL = 8  # held back


@pytest.fixture(scope="module")
def lm_and_cache(tmp_path_factory, reference_dir):
    root = tmp_path_factory.mktemp("held_back")
    model = save_tiny_qwen3_with_reference_tokenizer(root / "model", reference_dir, embed_scale=4.0)
    sample_data(
        SampleConfig(
            sources=[SourceSpec(uri="builtin:reference-train")],
            tokenizer=str(model),
            seq_len=SEQ,
            search_tokens=SEQ * SPLIT,
            distill_tokens=SEQ * 4,
            eval_tokens=0,
            output=str(root / "data"),
        )
    )
    teacher_logits(TeacherLogitsConfig(model=str(model), data=str(root / "data"), output=str(root / "cache")))
    return model, root / "cache"


class Reads:
    """Which search-split sequences each phase fed through a model."""

    def __init__(self, split_ids: torch.Tensor) -> None:
        self.index = {tuple(row.tolist()): i for i, row in enumerate(split_ids)}
        assert len(self.index) == len(split_ids), "the test needs distinct sequences"
        self.phase = None
        self.by_phase: dict[str, set[int]] = {}

    def record(self, ids: torch.Tensor) -> None:
        if self.phase is None or ids.dim() != 2:
            return
        rows = {self.index.get(tuple(r.tolist()), -1) for r in ids}
        self.by_phase.setdefault(self.phase, set()).update(rows)

    def during(self, phase: str, fn):
        def wrapped(*args, **kwargs):
            outer, self.phase = self.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = outer

        return wrapped


@contextlib.contextmanager
def recording(monkeypatch, cache):
    reads = Reads(TeacherTopK(str(cache)).load("search")["input_ids"])
    embedding_forward = torch.nn.Embedding.forward

    def forward(module, ids):
        reads.record(ids)
        return embedding_forward(module, ids)

    monkeypatch.setattr(torch.nn.Embedding, "forward", forward)
    for module, name, phase in (
        (search, "_initial_state", "init"),
        (search, "_run_steps", "train"),
        (search, "_choose", "final"),
        (choose, "_baseline", "sleb"),
        (choose, "_held_back_kl", "best"),
    ):
        monkeypatch.setattr(module, name, reads.during(phase, getattr(module, name)))
    yield reads


def test_held_back_final_selection_never_scores_sequences_the_search_trained_on(
    lm_and_cache, tmp_path, monkeypatch, caplog
):
    model, cache = lm_and_cache
    held = set(range(SPLIT - FINAL, SPLIT))
    cfg = dict(
        model=str(model), teacher_cache=str(cache), remove_ratio=0.34, search_tokens=SEQ * 4 * 30, batch_size=4,
        init_sequences=40, final_sequences=FINAL,
    )  # fmt: skip
    with recording(monkeypatch, cache) as reads:
        res = search_mask(SearchConfig(**cfg, selection_method="e3", output=str(tmp_path / "e3")))
    assert res["held_back_sequences"] == FINAL and res["training_sequences"] == SPLIT - FINAL
    # 30 steps × 4 sequences read the 32 of the training part 3.75 times, and the search says so.
    assert (
        "the search reads 3840 tokens from the 1024 of its split's training part: each sequence 3.8 times"
        in caplog.text
    )
    assert reads.by_phase["final"] == held  # the candidates are scored on the held-back part, all of it
    assert reads.by_phase["train"] == set(range(SPLIT - FINAL))  # 30 steps × 4 cover the training part
    assert reads.by_phase["init"] == set(range(SPLIT - FINAL))  # init_sequences 40 is capped to the training part
    assert all(c["kl"] >= 0 for c in res["candidates"])

    with recording(monkeypatch, cache) as reads:
        res = search_mask(SearchConfig(**cfg, selection_method="best", output=str(tmp_path / "best")))
    assert reads.by_phase["best"] == held and reads.by_phase["final"] == held
    assert not (reads.by_phase["train"] | reads.by_phase["init"] | reads.by_phase["sleb"]) & held
    e3 = next(c for c in res["candidates"] if c["source"] == "e3")
    sleb = next(c for c in res["candidates"] if c["source"] == "sleb")
    assert res["keep"] == min((e3, sleb), key=lambda c: c["held_back_kl"])["keep"]


def test_held_back_part_is_at_most_half_the_split_and_required():
    assert held_back_sequences(2528, 128) == 128  # the default split: 2,400 to train on, 128 held back
    assert held_back_sequences(40, 128) == 20  # a small split still trains on half of it
    assert held_back_sequences(40, 8, final_selection=False) == 0
    one = {k: torch.zeros(1, SEQ) for k in ("input_ids", "values", "ids", "lse")}
    with pytest.raises(E3PruneError, match="too few to hold any back") as err:
        search.split_search_data(one, SearchConfig(teacher_cache="c", output="o"))
    assert err.value.field == "teacher_cache"
    with pytest.raises(E3PruneError, match="keep final_selection true"):
        SearchConfig.parse(teacher_cache="c", output="o", selection_method="best", final_selection=False)
    train, held = search.split_search_data(
        one, SearchConfig(teacher_cache="c", output="o", selection_method="e3", final_selection=False)
    )
    assert train["input_ids"].size(0) == 1 and held["input_ids"].size(0) == 0
