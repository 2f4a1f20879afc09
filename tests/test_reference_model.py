"""The shipped reference model: loads, matches its card, and the builder is deterministic."""

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from e3prune.reference.build import ReferenceModelConfig, build_reference_model, demo_tokens, perplexity


def test_shipped_model_matches_its_card(reference_dir):
    log = json.loads((reference_dir / "training_log.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(reference_dir, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(reference_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert 16 <= model.config.num_hidden_layers <= 24 and 128 <= model.config.hidden_size <= 256
    assert len(tok) <= 8192 and tok.eos_token == "<|endoftext|>"
    size = sum(p.stat().st_size for p in reference_dir.iterdir())
    assert size <= 25 * 2**20, f"shipped files are {size / 2**20:.1f} MiB"
    heldout = load_file(reference_dir / "heldout_tokens.safetensors")["input_ids"].long()
    assert heldout.numel() == log["config"]["heldout_tokens"]
    # The card's full-model perplexity on its 64 spread held-out sequences, recomputed.
    torch.set_num_threads(2)
    seq = log["config"]["seq_len"]
    ppl = perplexity(model, demo_tokens(heldout, seq, 64), seq)
    assert ppl == pytest.approx(log["importance_demo"]["ppl"]["full"], rel=1e-3)
    assert log["heldout_perplexity"] < 100, "the shipped model should have learned something"
    # Layers differ in importance (the card's claim): which layers go changes perplexity a lot.
    randoms = [r["ppl"] for r in log["importance_demo"]["random"]]
    single = log["importance_demo"]["single_layer_ppl"]
    assert max(single) > 1.5 * min(single), "single-layer removal should range widely"
    assert max(randoms) > 1.1 * min(randoms + [log["importance_demo"]["ppl"]["last"]])
    # It generates text that decodes.
    ids = tok("import os\ndef ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert isinstance(tok.decode(out[0]), str) and out.shape[1] == ids.shape[1] + 8


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_builder_is_deterministic_and_writes_a_loadable_card(tmp_path):
    """A tiny build from a small part of the standard library, twice: identical weights."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"]) / "email"
    cfg = ReferenceModelConfig(
        num_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=512,
        seq_len=64,
        batch_size=4,
        train_steps=3,
        warmup_steps=1,
        heldout_every=4,
        heldout_tokens=2048,
        log_every_steps=1,
    )
    a = build_reference_model(cfg, tmp_path / "a", stdlib_root=root)
    b = build_reference_model(cfg, tmp_path / "b", stdlib_root=root)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert a["heldout_perplexity"] == b["heldout_perplexity"] and math.isfinite(a["heldout_perplexity"])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    card = (tmp_path / "a" / "README.md").read_text()
    assert "held-out perplexity" in card and "Training log" in card
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.num_hidden_layers == 2


def test_validation_build_options_give_a_llama_model_with_its_own_clean_split(tmp_path):
    """The second validation model's options (benchmarks/validation_model.py): Llama layout with untied
    embeddings, another split salt (another held-out set), and no training file that is a near-copy of a
    held-out file; its training files are written beside it for sampling search and distill data."""
    import gzip
    import sysconfig
    from pathlib import Path

    from e3prune.data_sources import NEAR_COPY_SHARE, _word_ngrams
    from e3prune.reference.build import is_heldout, stdlib_documents

    root = Path(sysconfig.get_paths()["stdlib"]) / "encodings"  # the codec tables: near-copies of each other
    cfg = ReferenceModelConfig(
        architecture="llama", split_salt="validation", exclude_near_copies=True,
        num_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=512, seq_len=64, batch_size=4, train_steps=2, warmup_steps=1, heldout_every=4,
        heldout_tokens=2048, log_every_steps=1,
    )  # fmt: skip
    summary = build_reference_model(cfg, tmp_path / "m", stdlib_root=root)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.config.tie_word_embeddings

    def read(name):
        with gzip.open(tmp_path / "m" / name, "rt") as fh:
            return [json.loads(line) for line in fh]

    heldout, train = read("heldout_corpus.jsonl.gz"), read("train_corpus.jsonl.gz")
    paths = [d.path for d in stdlib_documents(root)]
    assert [d["path"] for d in heldout] == [p for p in paths if is_heldout(p, 4, "validation")]
    assert {d["path"] for d in heldout} != {p for p in paths if is_heldout(p, 4)}, "the salt should move the split"
    grams = set().union(*(_word_ngrams(d["text"]) for d in heldout))
    dropped = [p for p in paths if not is_heldout(p, 4, "validation") and p not in {d["path"] for d in train}]
    assert dropped, "the codec tables should have near-copies to leave out"
    for d in train:
        own = _word_ngrams(d["text"])
        assert not own or len(own & grams) <= NEAR_COPY_SHARE * len(own)
    assert summary["corpus"]["train_files"] == len(train)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "salt `validation`" in card and "near-copies" in card


def test_cli_inspect_and_reference_path(reference_dir):
    out = subprocess.run(
        [sys.executable, "-m", "e3prune.cli", "reference-model", "path"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert out == str(reference_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "e3prune.cli", "inspect", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    info = json.loads(proc.stdout)
    assert info["model_type"] == "qwen3" and info["num_hidden_layers"] == 24
    assert (
        len(info["parameters_per_layer"]) == 24
        and info["parameters"]["total"] == sum(info["parameters_per_layer"]) + info["parameters"]["outside_layers"]
    )
    assert info["per_layer_fields"]["layer_types"] == ["full_attention"] * 24
