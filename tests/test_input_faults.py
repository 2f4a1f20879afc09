"""Input faults a user meets on the command line: the wrong directory given as a teacher cache,
budgets beyond the machine, unreadable source files, and a cache used with a model it does not
belong to. Each is one ``error: <field>: …`` line, exit status 2, before any heavy work."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from tiny_models import save_tiny_qwen3_with_reference_tokenizer

from e3prune import data as data_module
from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.distill import DistillConfig
from e3prune.distill_inputs import check_distill_inputs
from e3prune.errors import E3PruneError
from e3prune.model_io import load_config
from e3prune.run_config import RunConfig
from e3prune.search import SearchConfig, check_search_inputs
from e3prune.teacher import TeacherLogitsConfig, TeacherTopK, teacher_fingerprint, teacher_logits

SEQ = 256  # longer than the tiny model's 64 positions, within the reference model's 512


def _cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    return subprocess.run(
        [sys.executable, "-m", "e3prune.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def _one_error(proc: subprocess.CompletedProcess, field: str) -> str:
    """The one ``error:`` line of a refused command, which names ``field``."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {field}: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ref_data(reference_dir, tmp_path_factory):
    """Sequences of 256 tokens sampled with the reference tokenizer (the tiny models share it)."""
    out = tmp_path_factory.mktemp("data") / "sample"
    sample_data(
        SampleConfig(
            sources=[SourceSpec(uri="builtin:reference")],
            tokenizer=str(reference_dir),
            seq_len=SEQ,
            search_tokens=SEQ * 4,
            distill_tokens=SEQ * 4,
            eval_tokens=SEQ,
            output=str(out),
        )
    )
    return out


def _cache(model, data, out):
    teacher_logits(TeacherLogitsConfig(model=str(model), data=str(data), output=str(out), top_k=4, batch_size=4))
    return out


@pytest.fixture(scope="module")
def ref_cache(reference_dir, ref_data, tmp_path_factory):
    """The 24-layer reference model's cache of 256-token sequences."""
    return _cache(reference_dir, ref_data, tmp_path_factory.mktemp("cache") / "reference")


@pytest.fixture(scope="module")
def tiny_lm(reference_dir, tmp_path_factory):
    """6 layers, 64 positions, the reference vocabulary and tokenizer."""
    return save_tiny_qwen3_with_reference_tokenizer(tmp_path_factory.mktemp("tiny") / "model", reference_dir)


@pytest.fixture(scope="module")
def tiny_long(tiny_lm, tmp_path_factory):
    """The tiny model with 512 positions: the same weights, another config."""
    d = tmp_path_factory.mktemp("tiny") / "long"
    shutil.copytree(tiny_lm, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}, indent=2))
    return d


@pytest.fixture(scope="module")
def long_cache(tiny_long, ref_data, tmp_path_factory):
    return _cache(tiny_long, ref_data, tmp_path_factory.mktemp("cache") / "long")


@pytest.fixture(scope="module")
def old_long_cache(long_cache, tmp_path_factory):
    """The same cache as written before the manifest had a kind and a teacher fingerprint."""
    d = tmp_path_factory.mktemp("cache") / "old"
    shutil.copytree(long_cache, d)
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["kind"], manifest["teacher"]["fingerprint"], manifest["teacher"]["max_position_embeddings"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


# --------------------------------------------------------------------------- not a teacher cache


@pytest.mark.parametrize("step", ["search", "select", "distill"])
def test_sampled_data_given_as_teacher_cache(step, ref_data, tiny_lm, tmp_path):
    model_flag = ["--student" if step == "distill" else "--model", str(tiny_lm)]
    out = tmp_path / "out"
    proc = _cli(step, *model_flag, "--teacher-cache", str(ref_data), "--output", str(out), tmp_path=tmp_path)
    line = _one_error(proc, "teacher_cache")
    assert "is sampled data" in line and "not a teacher cache" in line and "e3prune teacher-logits" in line, line
    assert not out.exists()


def test_other_directories_given_as_teacher_cache(tmp_path):
    cases = {
        "no_manifest": (None, "no manifest.json"),
        "broken": ("{not json", "not valid JSON"),
        "a_list": ("[1, 2]", "not a manifest (not a JSON object)"),
        "other_kind": (json.dumps({"kind": "search_result", "format_version": 1}), "kind 'search_result'"),
        "unknown": (json.dumps({"format_version": 1}), "no kind and no top_k"),
        "newer": (json.dumps({"kind": "teacher_cache", "format_version": 2}), "format 2"),
        "partial": (json.dumps({"kind": "teacher_cache", "format_version": 1, "top_k": 4}), "lacks seq_len"),
    }
    for name, (manifest, words) in cases.items():
        d = tmp_path / name
        d.mkdir()
        if manifest is not None:
            (d / "manifest.json").write_text(manifest)
        with pytest.raises(E3PruneError) as err:
            TeacherTopK(str(d))
        assert err.value.field == "teacher_cache" and words in str(err.value), (name, str(err.value))


def test_a_teacher_cache_given_as_data(ref_cache, reference_dir, tmp_path):
    out = tmp_path / "c"
    proc = _cli(
        "teacher-logits", "--model", str(reference_dir), "--data", str(ref_cache), "--output", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert "is a teacher cache, not sampled data" in _one_error(proc, "data")
    assert not out.exists()


# --------------------------------------------------------------------------- budgets


def test_sample_budget_beyond_memory(tmp_path):
    out = tmp_path / "out"
    proc = _cli("sample", "--search-tokens", "100000000000", "--allow-repeat", "--output", str(out), tmp_path=tmp_path)
    line = _one_error(proc, "search_tokens")
    assert "800.0 GB of memory" in line and "is available" in line, line
    assert not out.exists()


def test_sample_budget_beyond_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(data_module, "available_memory", lambda: 10**18)
    out = tmp_path / "deep" / "out"
    with pytest.raises(E3PruneError) as err:
        sample_data(SampleConfig(distill_tokens=10**13, output=str(out)))
    msg = str(err.value)
    assert err.value.field == "distill_tokens" and "40,000.0 GB of disk" in msg and f"{tmp_path / 'deep'} has" in msg, msg
    assert not out.exists()


def test_sample_budget_beyond_the_staging_disk_of_an_s3_output(monkeypatch, tmp_path, s3):
    monkeypatch.setattr(data_module, "available_memory", lambda: 10**18)
    monkeypatch.setattr(data_module.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(E3PruneError) as err:
        sample_data(SampleConfig(eval_tokens=10**13, output=s3.uri("data/huge")))
    msg = str(err.value)
    assert err.value.field == "eval_tokens" and f"{tmp_path} has" in msg and "TMPDIR" in msg, msg


def test_memory_available_is_a_positive_number():
    have = data_module.available_memory()
    assert have is not None and have > 0


def test_search_tokens_beyond_any_real_search(ref_cache, tmp_path):
    proc = _cli(
        "search", "--teacher-cache", str(ref_cache), "--output", str(tmp_path / "s"),
        "--search-tokens", str(10**18), tmp_path=tmp_path,
    )  # fmt: skip
    line = _one_error(proc, "search_tokens")
    assert "less than or equal to 1000000000000" in line and str(10**18) in line, line
    SearchConfig.parse(teacher_cache="c", output="o", search_tokens=10**12)  # the bound itself is allowed


def test_distill_tokens_beyond_any_real_distillation(tiny_long, long_cache, tmp_path):
    proc = _cli(
        "distill", "--student", str(tiny_long), "--teacher-cache", str(long_cache), "--output", str(tmp_path / "d"),
        "--distill-tokens", str(10**18), tmp_path=tmp_path,
    )  # fmt: skip
    line = _one_error(proc, "distill_tokens")
    assert "less than or equal to 1000000000000" in line and str(10**18) in line, line
    assert not (tmp_path / "d").exists()
    with pytest.raises(E3PruneError) as err:  # the pipeline parameter is the same field: refused by the first step
        RunConfig.parse(distill_budget_tokens=10**18)
    assert err.value.field == "distill_budget_tokens"


# --------------------------------------------------------------------------- unreadable sources


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("empty.jsonl", b"", "is empty (0 bytes)"),
        ("blank.jsonl", b"\n  \n\n", "is empty (only blank lines)"),
        ("random.txt", bytes(range(128, 256)) * 16, "is not UTF-8 text"),
        ("broken.jsonl", b'{"text": "fine"}\n{"text": unquoted}\n', "is not valid JSON lines (line 2"),
        ("rows.jsonl", b'{"text": "fine"}\n["a", "list"]\n', "line 2 is a list"),
    ],
)
def test_unreadable_source_files(name, content, words, tmp_path):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out"
    line = _one_error(_cli("sample", "--source", str(src), "--output", str(out), tmp_path=tmp_path), "sources.0.uri")
    assert str(src) in line and words in line, line
    assert not out.exists()


# --------------------------------------------------------------------------- a cache and its model


def test_the_cache_records_its_teachers_fingerprint(ref_cache, reference_dir, tiny_lm, tiny_long):
    teacher = TeacherTopK(str(ref_cache)).manifest["teacher"]
    config = load_config(reference_dir)
    assert teacher["fingerprint"] == teacher_fingerprint(str(reference_dir), config)
    assert teacher["max_position_embeddings"] == 512
    fingerprints = {teacher_fingerprint(str(m), load_config(m))["config_sha256"] for m in (tiny_lm, tiny_long)}
    assert len(fingerprints | {teacher["fingerprint"]["config_sha256"]}) == 3


def test_search_and_select_accept_the_caches_own_teacher(ref_cache, reference_dir, tiny_long, long_cache, tmp_path):
    for model, cache in ((reference_dir, ref_cache), (tiny_long, long_cache)):
        cfg = SearchConfig.parse(model=str(model), teacher_cache=str(cache), output=str(tmp_path / "s"))
        L, _, reader = check_search_inputs(cfg)
        assert L == load_config(model).num_hidden_layers and reader.seq_len == SEQ


@pytest.mark.parametrize("step", ["search", "select"])
def test_search_and_select_refuse_another_model_than_the_caches_teacher(step, tiny_lm, ref_cache, tmp_path):
    """The 6-layer model with 64 positions against the 24-layer reference model's cache of 256-token sequences."""
    out = tmp_path / "out"
    proc = _cli(step, "--model", str(tiny_lm), "--teacher-cache", str(ref_cache), "--output", str(out), tmp_path=tmp_path)
    line = _one_error(proc, "model")
    assert f"{tiny_lm} (6 layers, qwen3) is not the teacher" in line, line
    assert "belongs to" in line and "(24 layers, qwen3)" in line and "e3prune teacher-logits --model" in line, line
    assert not out.exists()


def test_a_cache_without_fingerprint_is_checked_on_what_it_recorded(old_long_cache, reference_dir, tiny_lm, tmp_path):
    # Same type and layer count as its teacher: accepted, and then refused for its sequence length.
    out = tmp_path / "out"
    for step in ("search", "select"):
        args = ("--model", str(tiny_lm), "--teacher-cache", str(old_long_cache), "--output", str(out))
        line = _one_error(_cli(step, *args, tmp_path=tmp_path), "teacher_cache")
        assert "sequences have 256 tokens, the model has 64 positions" in line, (step, line)
        assert "belongs to teacher" in line and "(6 layers, qwen3)" in line, line
    # Another layer count than its teacher recorded: not its teacher.
    cfg = SearchConfig.parse(model=str(reference_dir), teacher_cache=str(old_long_cache), output=str(out))
    with pytest.raises(E3PruneError) as err:
        check_search_inputs(cfg)
    assert err.value.field == "model" and "(6 layers, qwen3)" in str(err.value)
    assert not out.exists()


def test_distill_checks_positions_not_the_teacher(tiny_lm, tiny_long, ref_cache, long_cache, old_long_cache, tmp_path):
    def check(student, cache):
        cfg = DistillConfig.parse(student=str(student), teacher_cache=str(cache), output=str(tmp_path / "d"))
        return check_distill_inputs(cfg, num_processes=1, probe_checkpoints=False)

    # A student is a pruned copy, not the teacher: any cache of its tokenizer that fits its positions, old or new.
    for cache in (ref_cache, long_cache, old_long_cache):
        assert check(tiny_long, cache).plan.seq_len == SEQ
    with pytest.raises(E3PruneError) as err:
        check(tiny_lm, ref_cache)
    msg = str(err.value)
    assert err.value.field == "teacher_cache" and "the student has 64 positions" in msg, msg
    assert "belongs to teacher" in msg and "(24 layers, qwen3)" in msg, msg
