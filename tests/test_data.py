"""Stage 0 data sampling: budgets, disjoint deterministic splits, mixtures, chat, S3, bad input."""

import gzip
import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from e3prune import cli
from e3prune.data import SampleConfig, load_split, read_manifest, sample_data, tokenizer_fingerprint
from e3prune.data_sources import builtin_corpus
from e3prune.errors import E3PruneError
from e3prune.model_io import load_tokenizer

DOC_ID = re.compile(r"doc(\d{5})(?!\d)")  # every test document starts with its 5-digit id


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep the Arrow files `datasets` converts local sources into out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture(scope="module")
def tokenizer(reference_dir):
    return load_tokenizer(reference_dir)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _numbered(first: int, count: int, tag: str = "word") -> list[dict]:
    """Documents of about 32 tokens, each unique and starting with its id: ``doc00017 word22 …``."""
    return [
        {"text": f"doc{n:05d} " + " ".join(f"{tag}{(n * 7 + k) % 97}" for k in range(12))}
        for n in range(first, first + count)
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("corpus") / "numbered.jsonl", _numbered(0, 600))


def _cfg(reference_dir, output, sources, **kw) -> SampleConfig:
    settings = dict(
        tokenizer=str(reference_dir),
        seq_len=64,
        eval_tokens=1000,
        search_tokens=2000,
        distill_tokens=4000,
        sources=sources,
        output=str(output),
    )
    return SampleConfig.parse({**settings, **kw})


def _doc_ids(ids: torch.Tensor, tokenizer) -> set[int]:
    # Sequences of a split are consecutive slices of one stream: decoding them joined restores the text.
    return {int(m) for m in DOC_ID.findall(tokenizer.decode(ids.flatten().tolist()))}


def test_budgets_are_met_with_whole_sequences(reference_dir, corpus, tokenizer, no_partial_dirs):
    out = no_partial_dirs / "data"
    manifest = sample_data(_cfg(reference_dir, out, [str(corpus)], shard_sequences=24))
    for split, budget in (("eval", 1000), ("search", 2000), ("distill", 4000)):
        info = manifest["splits"][split]
        sequences = -(-budget // 64)  # the fewest sequences that reach the budget
        assert (info["sequences"], info["tokens"], info["budget_tokens"]) == (sequences, sequences * 64, budget)
        assert info["shards"] == [f"{split}/shard-{k:05d}.safetensors" for k in range(-(-sequences // 24))]
        shard = load_file(str(out / info["shards"][0]))["input_ids"]
        assert shard.dtype == torch.int32 and shard.shape == (min(24, sequences), 64)
        ids = load_split(str(out), split)
        assert ids.dtype == torch.int64 and ids.shape == (sequences, 64)
        assert info["tokens_by_source"] == {"numbered": sequences * 64} and not info["repeated"]
        # Every document is followed by EOS: one EOS per ~32 tokens.
        assert (ids == tokenizer.eos_token_id).sum() >= ids.numel() // 40
    assert manifest["kind"] == "sampled_data" and manifest["format_version"] == 1
    assert manifest["seq_len"] == 64 and manifest["seed"] == 0
    assert manifest["eos_token_id"] == tokenizer.eos_token_id and manifest["vocab_size"] == len(tokenizer)
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(load_tokenizer(reference_dir))
    source = manifest["sources"][0]
    assert source["name"] == "numbered" and source["documents"] == 600 and source["tokens_available"] is None
    assert len(source["fingerprint"]) == 64
    assert read_manifest(str(out)) == manifest == json.loads((out / "manifest.json").read_text())


def test_same_seed_same_shards_other_seed_other_shards(reference_dir, corpus, tmp_path):
    first = sample_data(_cfg(reference_dir, tmp_path / "a", [str(corpus)]))
    again = sample_data(_cfg(reference_dir, tmp_path / "b", [str(corpus)]))
    other = sample_data(_cfg(reference_dir, tmp_path / "c", [str(corpus)], seed=1))
    assert first == again and other["seed"] == 1
    for split in ("eval", "search", "distill"):
        a = (tmp_path / "a" / split / "shard-00000.safetensors").read_bytes()
        assert a == (tmp_path / "b" / split / "shard-00000.safetensors").read_bytes()
        assert not torch.equal(load_split(str(tmp_path / "a"), split), load_split(str(tmp_path / "c"), split))


def test_splits_are_disjoint_by_whole_documents(reference_dir, corpus, tokenizer, tmp_path):
    sample_data(_cfg(reference_dir, tmp_path / "d", [str(corpus)]))
    ids = {s: _doc_ids(load_split(str(tmp_path / "d"), s), tokenizer) for s in ("eval", "search", "distill")}
    assert all(len(found) > 10 for found in ids.values())
    assert not ids["eval"] & ids["search"] and not ids["eval"] & ids["distill"] and not ids["search"] & ids["distill"]
    manifest = read_manifest(str(tmp_path / "d"))
    for split, found in ids.items():
        # The last document may be cut before its id; no other document is missing.
        assert len(found) <= manifest["splits"][split]["documents"] <= len(found) + 1


def test_eval_does_not_move_when_other_budgets_change(reference_dir, corpus, tmp_path):
    sample_data(_cfg(reference_dir, tmp_path / "small", [str(corpus)]))
    sample_data(_cfg(reference_dir, tmp_path / "big", [str(corpus)], distill_tokens=8000))
    sample_data(_cfg(reference_dir, tmp_path / "more_search", [str(corpus)], search_tokens=3000))
    small = str(tmp_path / "small")
    assert torch.equal(load_split(small, "eval"), load_split(str(tmp_path / "big"), "eval"))
    assert torch.equal(load_split(small, "search"), load_split(str(tmp_path / "big"), "search"))
    assert torch.equal(load_split(small, "eval"), load_split(str(tmp_path / "more_search"), "eval"))
    assert load_split(str(tmp_path / "big"), "distill").shape == (125, 64)


def test_mixture_weights_are_respected(reference_dir, tmp_path, tokenizer):
    alpha = _write_jsonl(tmp_path / "alpha.jsonl", _numbered(0, 500, tag="alpha"))
    beta = _write_jsonl(tmp_path / "beta.jsonl", _numbered(1000, 500, tag="beta"))
    sources = [{"uri": str(alpha), "weight": 3.0}, {"uri": str(beta), "weight": 1.0}]
    manifest = sample_data(_cfg(reference_dir, tmp_path / "mix", sources, distill_tokens=8000))
    for split in ("eval", "search", "distill"):
        by_source = manifest["splits"][split]["tokens_by_source"]
        assert set(by_source) == {"alpha", "beta"}
        assert abs(by_source["alpha"] / manifest["splits"][split]["tokens"] - 0.75) < 0.05, (split, by_source)
    # Both sources are shuffled together, not laid end to end.
    text = tokenizer.decode(load_split(str(tmp_path / "mix"), "distill")[:16].flatten().tolist())
    assert "alpha" in text and "beta" in text
    assert [s["share"] for s in manifest["sources"]] == [0.75, 0.25]


def test_chat_messages_are_rendered_with_the_chat_template(reference_dir, tmp_path, tokenizer):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question{n:05d} what is {n} plus one"},
                {"role": "assistant", "content": f"it is {n + 1}"},
            ]
        }
        for n in range(600)
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    sample_data(_cfg(reference_dir, tmp_path / "chat", [{"uri": str(data), "messages_field": "messages"}]))
    text = tokenizer.decode(load_split(str(tmp_path / "chat"), "distill").flatten().tolist())
    n = int(re.search(r"<\|user\|>\nquestion(\d{5})", text).group(1))
    expected = tokenizer.apply_chat_template(rows[n]["messages"], tokenize=False)
    assert expected.startswith("<|user|>\n") and expected in text
    assert "'role'" not in text and '"content"' not in text


def test_builtin_source_is_the_default(reference_dir, tmp_path):
    cfg = SampleConfig.parse(
        output=str(tmp_path / "builtin"), seq_len=128, eval_tokens=512, search_tokens=512, distill_tokens=1024
    )
    assert cfg.tokenizer == str(reference_dir) and cfg.sources[0].uri == "builtin:reference"
    manifest = sample_data(cfg)
    assert builtin_corpus() == reference_dir / "heldout_corpus.jsonl.gz"
    with gzip.open(builtin_corpus(), "rt") as fh:
        rows = sum(1 for _ in fh)
    assert manifest["sources"][0]["name"] == "reference" and manifest["sources"][0]["documents"] == rows
    assert load_split(str(tmp_path / "builtin"), "distill").shape == (8, 128)


def test_small_data_errors_unless_repeat_then_cycles_within_splits(reference_dir, tmp_path, tokenizer):
    small = _write_jsonl(tmp_path / "small.jsonl", _numbered(0, 30))  # about 960 tokens
    with pytest.raises(E3PruneError) as err:
        sample_data(_cfg(reference_dir, tmp_path / "no", [str(small)], eval_tokens=200, search_tokens=200))
    assert err.value.field == "distill_tokens" and "available" in str(err.value)
    assert "allow_repeat" in str(err.value) and not (tmp_path / "no").exists()

    out = tmp_path / "yes"
    manifest = sample_data(_cfg(reference_dir, out, [str(small)], allow_repeat=True))
    assert manifest["splits"]["distill"]["sequences"] == 63 and manifest["splits"]["distill"]["repeated"]
    assert manifest["sources"][0]["tokens_available"] == manifest["sources"][0]["tokens_read"] > 500
    ids = {s: _doc_ids(load_split(str(out), s), tokenizer) for s in ("eval", "search", "distill")}
    assert all(ids.values())
    assert not ids["eval"] & ids["search"] and not ids["eval"] & ids["distill"] and not ids["search"] & ids["distill"]


def test_zero_budget_gives_an_empty_split(reference_dir, corpus, tmp_path):
    manifest = sample_data(_cfg(reference_dir, tmp_path / "z", [str(corpus)], search_tokens=0))
    assert manifest["splits"]["search"] == {
        "budget_tokens": 0,
        "sequences": 0,
        "tokens": 0,
        "shards": [],
        "tokens_by_source": {"numbered": 0},
        "documents": 0,
        "repeated": False,
    }
    for split, words in (("search", "is empty"), ("train", "no split 'train'")):
        with pytest.raises(E3PruneError) as err:
            load_split(str(tmp_path / "z"), split)
        assert err.value.field == "split" and words in str(err.value)


def test_s3_output(reference_dir, corpus, tmp_path, s3):
    uri = s3.uri("data/run1")
    manifest = sample_data(_cfg(reference_dir, uri, [str(corpus)]))
    sample_data(_cfg(reference_dir, tmp_path / "local", [str(corpus)]))
    assert read_manifest(uri) == manifest
    for split in ("eval", "search", "distill"):
        assert torch.equal(load_split(uri, split), load_split(str(tmp_path / "local"), split))
    with pytest.raises(E3PruneError) as err:
        sample_data(_cfg(reference_dir, uri, [str(corpus)]))
    assert err.value.field == "output" and "already holds" in str(err.value)
    with pytest.raises(E3PruneError) as err:
        read_manifest(s3.uri("data/never-written"))
    assert err.value.field == "data" and "no _COMPLETE.json marker" in str(err.value)


def _bad_sources(tmp: Path) -> dict[str, object]:
    """Named files for the bad-input cases, written on demand."""
    return {
        "no_field": _write_jsonl(tmp / "body.jsonl", [{"body": "x", "id": 1}]),
        "empty": _write_jsonl(tmp / "empty.jsonl", [{"text": ""}, {"text": "  \n"}]),
        "numbers": _write_jsonl(tmp / "numbers.jsonl", [{"text": 7}]),
        "csv": (tmp / "data.csv", (tmp / "data.csv").write_text("text\nhello\n"))[0],
        "zero_bytes": (tmp / "zero.jsonl", (tmp / "zero.jsonl").write_bytes(b""))[0],
        "binary": (tmp / "binary.txt", (tmp / "binary.txt").write_bytes(bytes(range(256)) * 8))[0],
        "not_json": (tmp / "lines.jsonl", (tmp / "lines.jsonl").write_text('{"text": "a"}\ntext: b\n'))[0],
    }


BAD_INPUTS = [
    # (case id, config overrides given the fixture files, field, words in the message)
    (
        "missing text field",
        lambda f, c: {"sources": [str(f["no_field"])]},
        "sources.0.text_field",
        ["'text'", "'body'", "body, id"],
    ),
    (
        "missing messages field",
        lambda f, c: {"sources": [{"uri": str(c), "messages_field": "messages"}]},
        "sources.0.messages_field",
        ["'messages'", "text"],
    ),
    ("empty source", lambda f, c: {"sources": [str(f["empty"])]}, "sources.0.uri", ["no non-empty documents"]),
    ("text field is not text", lambda f, c: {"sources": [str(f["numbers"])]}, "sources.0.text_field", ["int"]),
    ("zero-byte file", lambda f, c: {"sources": [str(f["zero_bytes"])]}, "sources.0.uri", ["zero.jsonl is empty"]),
    ("binary text file", lambda f, c: {"sources": [str(f["binary"])]}, "sources.0.uri", ["binary.txt is not UTF-8"]),
    (
        "not JSON lines",
        lambda f, c: {"sources": [str(f["not_json"])]},
        "sources.0.uri",
        ["lines.jsonl is not valid JSON lines (line 2"],
    ),
    (
        "budget over the data",
        lambda f, c: {"sources": [str(c)], "distill_tokens": 10**6},
        "distill_tokens",
        ["available", "allow_repeat"],
    ),
    ("seq_len over positions", lambda f, c: {"sources": [str(c)], "seq_len": 1024}, "seq_len", ["512"]),
    ("unknown format", lambda f, c: {"sources": [str(f["csv"])]}, "sources.0.uri", ["unknown source format"]),
    ("s3 source", lambda f, c: {"sources": ["s3://bucket/data.jsonl"]}, "sources.0.uri", ["unknown source format"]),
    ("missing path", lambda f, c: {"sources": ["./nowhere/train.jsonl"]}, "sources.0.uri", ["does not exist"]),
    ("unknown builtin", lambda f, c: {"sources": ["builtin:wiki"]}, "sources.0.uri", ["builtin:reference"]),
    (
        "weight not positive",
        lambda f, c: {"sources": [{"uri": str(c), "weight": 0}]},
        "sources.0.weight",
        ["greater than 0"],
    ),
    (
        "negative budget",
        lambda f, c: {"sources": [str(c)], "eval_tokens": -1},
        "eval_tokens",
        ["greater than or equal to 0"],
    ),
    ("duplicate names", lambda f, c: {"sources": [str(c), str(c)]}, "sources", ["distinct names"]),
    (
        "tokenizer missing",
        lambda f, c: {"sources": [str(c)], "tokenizer": "/nonexistent/model"},
        "tokenizer",
        ["not a directory"],
    ),
    ("unknown setting", lambda f, c: {"sources": [str(c)], "seq_length": 64}, "seq_length", ["unknown setting"]),
]


@pytest.mark.parametrize(("case", "overrides", "field", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_field_and_writes_nothing(
    reference_dir, corpus, no_partial_dirs, case, overrides, field, words
):
    files = _bad_sources(no_partial_dirs / "inputs")
    out = no_partial_dirs / "out"
    settings = {
        "tokenizer": str(reference_dir),
        "seq_len": 64,
        "eval_tokens": 256,
        "search_tokens": 256,
        "distill_tokens": 256,
        "output": str(out),
        **overrides(files, corpus),
    }
    with pytest.raises(E3PruneError) as err:
        sample_data(SampleConfig.parse(settings))
    assert err.value.field == field, str(err.value)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not out.exists()


def test_hub_ids_are_loaded_from_the_hub(reference_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # No hub is reachable here: offline mode makes the attempt fail at once instead of after retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = _cfg(reference_dir, tmp_path / "out", ["someorg/somedata"])
    assert cfg.sources[0].name == "someorg/somedata"
    with pytest.raises(E3PruneError) as err:
        sample_data(cfg)
    assert err.value.field == "sources.0.uri" and "as a Hugging Face hub dataset" in str(err.value)


def test_existing_output_is_refused_before_any_work(reference_dir, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(E3PruneError) as err:
        sample_data(_cfg(reference_dir, out, ["./nowhere.jsonl"]))  # the output is checked first
    assert err.value.field == "output" and (out / "keep.txt").read_text() == "precious"


def test_cli_sample(reference_dir, corpus, tmp_path, capsys):
    other = _write_jsonl(tmp_path / "other.jsonl", _numbered(5000, 300, tag="other"))
    out = tmp_path / "cli"
    args = [
        "sample",
        "--source",
        f"{corpus}:3",
        "--source",
        str(other),
        "--tokenizer",
        str(reference_dir),
        "--seq-len",
        "64",
        "--eval-tokens",
        "512",
        "--search-tokens",
        "512",
        "--distill-tokens",
        "1024",
        "--seed",
        "3",
        "--output",
        str(out),
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "distill" in printed and "1,024 tokens" in printed and f"wrote {out}" in printed
    manifest = read_manifest(str(out))
    assert [(s["name"], s["weight"]) for s in manifest["sources"]] == [("numbered", 3.0), ("other", 1.0)]
    assert manifest["seed"] == 3

    assert cli.main([*args[:-1], str(tmp_path / "bad"), "--seq-len", "4096"]) == 2
    assert capsys.readouterr().err.startswith("error: seq_len: ")
    assert cli._source_arg("builtin:reference") == {"uri": "builtin:reference"}
    assert cli._source_arg("s3://b/x.jsonl:0.5") == {"uri": "s3://b/x.jsonl", "weight": 0.5}
