"""``builtin:reference-train``: the reference model's training files as a data source, and sources
limited to some splits (docs/method.md, Stage 0)."""

from __future__ import annotations

import gzip
import json

import pytest

from e3prune.data import DEFAULT_SOURCES, SampleConfig, SourceSpec, sample_data
from e3prune.data_sources import (
    NEAR_COPY_SHARE,
    _word_ngrams,
    builtin_corpus,
    open_source,
    open_tokenizer,
    reference_train_dataset,
)
from e3prune.errors import E3PruneError
from e3prune.reference.build import train_documents


def _heldout_docs() -> list[dict]:
    with gzip.open(builtin_corpus(), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_reference_train_is_the_builds_training_files_without_held_out_text(reference_dir):
    """Every document is one the build trains on; none is a held-out file or a near-copy of one;
    and it is large enough for the default search and distill budgets at seq_len 256."""
    dataset, fingerprint = reference_train_dataset()
    train = {d.path: d.text for d in train_documents()}
    heldout = _heldout_docs()
    log = json.loads((reference_dir / "training_log.json").read_text())
    assert len(train) == log["corpus"]["train_files"]  # the build's own selection, file for file
    paths, texts = list(dataset["path"]), list(dataset["text"])
    assert all(train[p] == t for p, t in zip(paths, texts, strict=True))
    assert not set(paths) & {d["path"] for d in heldout}
    held_grams = set().union(*(_word_ngrams(d["text"]) for d in heldout))
    for text in texts:
        grams = _word_ngrams(text)
        assert len(grams & held_grams) <= NEAR_COPY_SHARE * max(1, len(grams))
    assert len(paths) > 0.8 * len(train)  # the near-copies are a minority (the codec tables)
    tokenizer = open_tokenizer(str(reference_dir), 256)
    tokens = sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    assert tokens >= 2_500_000, tokens  # ≥ 9,765 sequences of 256: the default search and distill splits once
    assert (
        tokens
        >= SampleConfig.model_fields["search_tokens"].default + SampleConfig.model_fields["distill_tokens"].default
    )
    assert len(fingerprint) == 64 and reference_train_dataset() == (dataset, fingerprint)


def test_default_sources_sample_eval_from_held_out_text_only(reference_dir, tmp_path):
    manifest = sample_data(
        SampleConfig(
            seq_len=64, search_tokens=64 * 20, distill_tokens=64 * 10, eval_tokens=64 * 8, output=str(tmp_path)
        )
    )
    assert [s["uri"] for s in manifest["sources"]] == [s["uri"] for s in DEFAULT_SOURCES]
    by_source = {split: info["tokens_by_source"] for split, info in manifest["splits"].items()}
    assert by_source["eval"] == {"reference": 64 * 8, "reference-train": 0}
    assert by_source["search"] == {"reference": 0, "reference-train": 64 * 20}
    assert by_source["distill"] == {"reference": 0, "reference-train": 64 * 10}
    assert manifest["sources"][0]["splits"] == ["eval"]


def test_source_splits_are_checked(reference_dir, tmp_path):
    only_eval = [{"uri": "builtin:reference", "splits": ["eval"]}]
    with pytest.raises(E3PruneError, match="no source feeds the search and distill split"):
        SampleConfig.parse(sources=only_eval, output=str(tmp_path))
    assert SampleConfig.parse(sources=only_eval, search_tokens=0, distill_tokens=0, output=str(tmp_path))
    with pytest.raises(E3PruneError, match="name each split once"):
        SampleConfig.parse(sources=[{"uri": "builtin:reference", "splits": ["eval", "eval"]}], output=str(tmp_path))
    with pytest.raises(E3PruneError, match="Input should be 'search', 'distill' or 'eval'"):
        SampleConfig.parse(sources=[{"uri": "builtin:reference", "splits": ["train"]}], output=str(tmp_path))
    tokenizer = open_tokenizer(str(reference_dir), 64)
    with pytest.raises(E3PruneError, match="builtin:reference, builtin:reference-train") as err:
        open_source(0, SourceSpec(uri="builtin:nothing"), tokenizer)
    assert err.value.field == "sources.0.uri"
