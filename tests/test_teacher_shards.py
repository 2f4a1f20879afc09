"""The teacher pass fanned out over tasks (``teacher_shards``), joined, and an ``s3://`` cache streamed.

Library level: N = 2 and 3 tasks write the very files (byte for byte) an undivided pass writes, and
their joined cache reads tensor for tensor like it; the join refuses parts that do not make one
pass; a run whose ``teacher_shards`` exceeds what its splits can use fails in the first step. On
the real S3 server: a cache of many small files is read through a local copy of at most 2 files
(counted on disk during the read), equal to the local cache, also when joined from parts under
different prefixes; a shard changed on S3 is refused. Through ``kfp.local``: the whole pipeline
with ``teacher_shards=2`` fans the teacher out, and its cache equals a 1-task cache of the library.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_models import save_tiny_qwen3_with_reference_tokenizer

from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.distill import DistillConfig, distill
from e3prune.errors import E3PruneError
from e3prune.run_config import RunConfig
from e3prune.teacher import TeacherLogitsConfig, TeacherTopK, join_teacher_cache, task_files, teacher_logits

SEQ = 32
FILE = 4  # sequences a cache file: search 37 sequences -> 10 files (the last of 1), distill 7 -> 2
SPLITS = ("search", "distill")


@pytest.fixture(scope="module")
def tiny(reference_dir, tmp_path_factory):
    return save_tiny_qwen3_with_reference_tokenizer(tmp_path_factory.mktemp("tiny") / "model", reference_dir)


@pytest.fixture(scope="module")
def data(reference_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sample"
    sample_data(
        SampleConfig(
            sources=[SourceSpec(uri="builtin:reference")],
            tokenizer=str(reference_dir),
            seq_len=SEQ,
            search_tokens=SEQ * 37,
            distill_tokens=SEQ * 7,
            eval_tokens=SEQ * 2,
            output=str(out),
        )
    )
    return out


def run_tasks(model, data, out: Path, shards: int, **extra) -> list[str]:
    """The ``shards`` tasks of one pass, each into its own output (as the pipeline's pods do)."""
    parts, outputs = [], extra.pop("outputs", {})
    for index in range(shards):
        uri = outputs.get(index) or str(out / f"part-{index}")
        cfg = {"model": str(model), "data": str(data), "output": uri, "top_k": 4, "batch_size": 3,
               "shard_sequences": FILE, **extra}  # fmt: skip
        teacher_logits(TeacherLogitsConfig(**cfg, shards=shards, shard_index=index))
        parts.append(uri)
    return parts


@pytest.fixture(scope="module")
def whole(tiny, data, tmp_path_factory) -> Path:
    """The undivided pass (one task): the reference every fanned-out cache must equal."""
    (uri,) = run_tasks(tiny, data, tmp_path_factory.mktemp("whole"), 1)
    return Path(uri)


def assert_reads_equal(a: TeacherTopK, b: TeacherTopK) -> None:
    for split in SPLITS:
        assert a.sequences(split) == b.sequences(split)
        left, right = a.load(split), b.load(split)
        assert left.keys() == right.keys() == {"input_ids", "values", "ids", "lse"}
        for key in left:
            assert left[key].dtype == right[key].dtype and left[key].equal(right[key]), (split, key)
        for start, count in ((0, 1), (3, 2), (FILE - 1, FILE + 3), (a.sequences(split) - 1, 1)):  # across files
            x, y = a.batch(split, start, count), b.batch(split, start, count)
            assert all(x[k].equal(y[k]) for k in x), (split, start, count)


def test_tasks_compute_contiguous_disjoint_slices_of_whole_files_covering_every_file_once():
    for files in range(1, 30):
        for shards in range(1, 12):
            slices = [task_files(files * FILE - 1, FILE, shards, i) for i in range(shards)]
            assert [f for s in slices for f in s] == list(range(files)), (files, shards)
            sizes = [len(s) for s in slices]
            assert max(sizes) - min(sizes) <= 1
    assert [list(task_files(7, FILE, 3, i)) for i in range(3)] == [[], [0], [1]]  # an empty slice


@pytest.mark.parametrize("shards", [2, 3])
def test_a_pass_of_n_tasks_joins_into_the_files_and_reads_of_one_task(tiny, data, whole, tmp_path, shards):
    parts = run_tasks(tiny, data, tmp_path, shards)
    for uri in parts:
        manifest = json.loads((Path(uri) / "manifest.json").read_text())
        assert manifest["kind"] == "teacher_cache_part"
    joined = join_teacher_cache(parts, str(tmp_path / "joined"))
    reference = json.loads((whole / "manifest.json").read_text())
    for split in SPLITS:
        refs = joined["splits"][split]["shards"]
        assert [Path(r).name for r in refs] == [Path(r).name for r in reference["splits"][split]["shards"]]
        for ref, rel in zip(refs, reference["splits"][split]["shards"], strict=True):
            assert Path(ref).is_absolute() and Path(ref).read_bytes() == (whole / rel).read_bytes(), ref
        assert joined["splits"][split]["shard_details"] == reference["splits"][split]["shard_details"]
        assert joined["splits"][split]["sequences"] == reference["splits"][split]["sequences"]
    for key in ("kind", "top_k", "seq_len", "vocab_size", "tokenizer", "data", "teacher"):
        assert joined[key] == reference[key], key
    assert not list((tmp_path / "joined").rglob("*.safetensors")), "the join copied shard data"
    assert_reads_equal(TeacherTopK(str(tmp_path / "joined")), TeacherTopK(str(whole)))


def test_with_more_tasks_than_a_split_has_files_a_task_gets_an_empty_slice_of_it(tiny, data, whole, tmp_path):
    parts = run_tasks(tiny, data, tmp_path, 3)  # distill has 2 files: task 0 computes none of it
    first = json.loads((Path(parts[0]) / "manifest.json").read_text())
    assert first["splits"]["distill"]["shards"] == [] and first["splits"]["distill"]["sequences"] == 0
    assert not (Path(parts[0]) / "distill").exists()
    assert len(first["splits"]["search"]["shards"]) == 3
    join_teacher_cache(parts, str(tmp_path / "j"))
    assert_reads_equal(TeacherTopK(str(tmp_path / "j")), TeacherTopK(str(whole)))


def test_a_part_is_refused_by_every_reader_until_joined(tiny, data, tmp_path):
    parts = run_tasks(tiny, data, tmp_path, 2)
    with pytest.raises(E3PruneError) as err:
        TeacherTopK(parts[1])
    assert err.value.field == "teacher_cache"
    assert "part 1 of 2" in str(err.value) and "join" in str(err.value)


def _refused(parts: list[str], out: Path, *needles: str) -> None:
    with pytest.raises(E3PruneError) as err:
        join_teacher_cache(parts, str(out))
    assert err.value.field == "parts", err.value
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not out.exists(), "a refused join wrote an output"


def test_the_join_refuses_parts_that_are_not_one_whole_pass(tiny, data, reference_dir, tmp_path):
    parts = run_tasks(tiny, data, tmp_path / "a", 3)
    _refused(parts[:2], tmp_path / "o1", "part 0 of 3", "2 parts were given")  # one missing
    _refused([parts[1], parts[0], parts[2]], tmp_path / "o2", "tasks [1, 0, 2]")  # out of order
    _refused([parts[0], parts[1], parts[1]], tmp_path / "o3", "tasks [0, 1, 1]")  # one twice, one missing
    other_k = run_tasks(tiny, data, tmp_path / "k", 3, top_k=5)
    _refused([parts[0], other_k[1], parts[2]], tmp_path / "o4", "top_k differ")
    other_teacher = tmp_path / "other"  # another config, so another fingerprint (the weights are not hashed)
    shutil.copytree(tiny, other_teacher)
    config = json.loads((other_teacher / "config.json").read_text())
    (other_teacher / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    other_t = run_tasks(other_teacher, data, tmp_path / "t", 3)
    _refused([parts[0], parts[1], other_t[2]], tmp_path / "o5", "another teacher")
    # A part whose recorded slice overlaps its neighbour's (as a task of another layout would write).
    bent = tmp_path / "bent"
    shutil.copytree(parts[1], bent)
    manifest = json.loads((bent / "manifest.json").read_text())
    manifest["part"]["splits"]["search"]["first_file"] -= 1
    (bent / "manifest.json").write_text(json.dumps(manifest))
    _refused([parts[0], str(bent), parts[2]], tmp_path / "o6", "overlap or leave files out")
    # A part's file gone after it was written.
    gone = tmp_path / "gone"
    shutil.copytree(parts[2], gone)
    next((gone / "search").glob("*.safetensors")).unlink()
    _refused([parts[0], parts[1], str(gone)], tmp_path / "o7", "missing")
    _refused([], tmp_path / "o8", "no parts")
    join_teacher_cache(parts, str(tmp_path / "joined"))
    _refused([str(tmp_path / "joined")], tmp_path / "o9", "a joined cache already")


def test_a_joined_cache_whose_parts_were_removed_is_refused_when_opened(tiny, data, tmp_path):
    parts = run_tasks(tiny, data, tmp_path, 2)
    join_teacher_cache(parts, str(tmp_path / "joined"))
    shutil.rmtree(parts[1])
    with pytest.raises(E3PruneError) as err:
        TeacherTopK(str(tmp_path / "joined"))
    assert err.value.field == "teacher_cache" and "keep" in str(err.value)


def test_teacher_shards_beyond_what_the_splits_can_use_fails_in_the_first_step():
    small = {
        "seq_len": 128,
        "search_split_tokens": 128 * 40,
        "distill_split_tokens": 128 * 100,
        "teacher_shard_sequences": 16,
    }
    RunConfig.parse(**small, teacher_shards=7).check()  # distill: 100 sequences, 7 files of 16
    with pytest.raises(E3PruneError) as err:
        RunConfig.parse(**small, teacher_shards=8).check()
    message = str(err.value)
    assert err.value.field == "teacher_shards" and message.startswith("teacher_shards: 8 teacher tasks")
    assert "the allowed maximum is 7" in message and "teacher_shard_sequences" in message
    # With one sequence a file, the maximum is the sequences of the largest split (split tokens // seq_len).
    with pytest.raises(E3PruneError, match="the allowed maximum is 100"):
        RunConfig.parse(**{**small, "teacher_shard_sequences": 1}, teacher_shards=101).check()
    with pytest.raises(E3PruneError) as err:
        RunConfig.parse(teacher_shards=0)
    assert err.value.field == "teacher_shards"
    with pytest.raises(E3PruneError) as err:
        RunConfig.parse(teacher_shards=257)
    assert err.value.field == "teacher_shards" and "256" in str(err.value)


def test_the_first_step_hands_the_pipeline_one_task_id_per_teacher_shard(tmp_path):
    from kfp_calls import call_detect_release

    found = call_detect_release(
        tmp_path, mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", teacher_shards=3,
        teacher_shard_sequences=16,
    )  # fmt: skip
    assert found.teacher_shard_ids == [0, 1, 2]
    assert found.params["teacher"]["shards"] == 3 and found.params["teacher"]["shard_sequences"] == 16


# ------------------------------------------------------------------ streaming an s3:// cache


def upload(s3, local: Path, rel: str) -> str:
    """A local output published to S3 as a step publishes it (files, then the marker)."""
    from e3prune import storage

    uri = s3.uri(rel)
    with storage.output_dir(uri) as out:
        shutil.copytree(local, out, dirs_exist_ok=True)
    return uri


def test_an_s3_cache_is_streamed_through_at_most_2_local_files_verified_and_equal_to_the_local_one(
    s3, whole, monkeypatch
):
    uri = upload(s3, whole, "cache")
    monkeypatch.setenv("E3PRUNE_TEACHER_CACHE_SHARDS", "2")
    reader = TeacherTopK(uri)
    local = TeacherTopK(str(whole))
    most, fetched = 0, set()
    for split in SPLITS:
        for batch_size in (3, 5):  # batches that cross file boundaries, and read files again
            for i, (got, want) in enumerate(
                zip(reader.iter_batches(split, batch_size), local.iter_batches(split, batch_size), strict=True)
            ):
                on_disk = [p for p in reader._local_shards.directory.iterdir() if p.is_file()]
                most = max(most, len(on_disk))
                assert len(on_disk) <= 2, (split, i, on_disk)
                fetched.update(p.name for p in on_disk)
                assert all(got[k].equal(want[k]) for k in want), (split, i)
    assert most == 2 and len(fetched) == 12  # every one of the 10 + 2 files passed through
    assert not list(Path(os.environ["E3PRUNE_CACHE"]).glob("s3/**/*.safetensors")), "the whole prefix was downloaded"
    directory = reader._local_shards.directory
    reader.close()
    assert not directory.exists()


def test_a_shard_changed_on_s3_is_refused_not_used(s3, whole):
    uri = upload(s3, whole, "cache")
    reader = TeacherTopK(uri, max_local_shards=2)
    first = reader.batch("search", 0, 1)  # file 0 fetched and verified
    key = s3.key("cache/search/shard-00003.safetensors")
    body = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # one byte of lse: same size, other content
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))
    with pytest.raises(E3PruneError) as err:
        reader.batch("search", 3 * FILE, 2)
    message = str(err.value)
    assert (
        err.value.field == "teacher_cache" and "shard-00003" in message and "changed after it was published" in message
    )
    assert [p.name for p in reader._local_shards.directory.iterdir()] == [reader.local_files()[0].name]
    assert first["input_ids"].equal(reader.batch("search", 0, 1)["input_ids"])  # the good file still reads


def test_a_joined_cache_of_parts_under_different_s3_prefixes_streams_equal_to_one_task(s3, tiny, data, whole, tmp_path):
    outputs = {0: s3.uri("pods/a/teacher"), 1: s3.uri("elsewhere/b/teacher")}
    parts = run_tasks(tiny, data, tmp_path, 2, outputs=outputs)
    joined = join_teacher_cache(parts, s3.uri("joined"))
    refs = joined["splits"]["search"]["shards"]
    assert refs[0].startswith(parts[0] + "/search/") and refs[-1].startswith(parts[1] + "/search/")
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=s3.key("joined/"))["Contents"]
    assert sorted(Path(o["Key"]).name for o in listed) == ["_COMPLETE.json", "manifest.json"]  # no data copied
    reader = TeacherTopK(s3.uri("joined"), max_local_shards=1)
    assert_reads_equal(reader, TeacherTopK(str(whole)))
    assert len(reader.local_files()) == 1
    # A local join of the same S3 parts reads the same way.
    join_teacher_cache(parts, str(tmp_path / "j"))
    assert_reads_equal(TeacherTopK(str(tmp_path / "j"), max_local_shards=2), TeacherTopK(str(whole)))


def test_an_s3_cache_whose_manifest_lists_no_file_details_is_downloaded_whole_as_before(s3, whole, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(whole, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        del entry["shard_details"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    reader = TeacherTopK(upload(s3, old, "old"), max_local_shards=1)
    assert reader.local_files() == [] and (reader.root / "search" / "shard-00009.safetensors").is_file()
    assert_reads_equal(reader, TeacherTopK(str(whole)))


def test_the_local_shard_bound_is_checked(monkeypatch, s3, whole):
    uri = upload(s3, whole, "cache")
    for bad in ("0", "four", "-1"):
        monkeypatch.setenv("E3PRUNE_TEACHER_CACHE_SHARDS", bad)
        with pytest.raises(E3PruneError) as err:
            TeacherTopK(uri)
        assert err.value.field == "E3PRUNE_TEACHER_CACHE_SHARDS"


# ------------------------------------------------------------------ the pipeline, through kfp.local

# The pipeline's SMALL budgets (tests/test_pipeline_e2e.py) at 64-token sequences: 64 sequences a split,
# 4 cache files of 16, so each of 2 teacher tasks computes 2 files of each split.
PIPELINE_SMALL = {
    "seq_len": 64,
    "search_split_tokens": 4096,
    "distill_split_tokens": 4096,
    "eval_split_tokens": 2048,
    "search_budget_tokens": 2048,
    "distill_budget_tokens": 2048,
    "teacher_shard_sequences": 16,
}


def run_pipeline(output: Path, **params) -> dict:
    """The whole pipeline through kfp.local (``e3prune run``'s runner), with ``params`` over PIPELINE_SMALL.

    Returns run_local's result plus ``joined``: the cache the later steps read. Kept separate so a
    test of other fan-outs (distill processes, say) can run the same pipeline with its own settings.
    """
    from e3prune_pipelines.local_run import run_local

    started = time.time()
    result = run_local({**PIPELINE_SMALL, **params}, output)
    run_dir = Path(result["run_dir"])
    out = json.loads((run_dir / "join-teacher-cache" / "executor_output.json").read_text())
    (art,) = out["artifacts"]["cache"]["artifacts"]
    return {**result, "joined": art["metadata"]["uri"], "wall_seconds": time.time() - started}


@pytest.mark.slow
def test_the_pipeline_with_2_teacher_tasks_and_2_distill_processes_equals_1_task_and_1_process(
    tmp_path, monkeypatch, reference_dir
):
    """Issue 11's acceptance run: the whole pipeline through kfp.local with ``teacher_shards=2`` and
    ``distill_processes=2`` (gloo). Its joined cache is byte for byte the 1-task cache, and its
    distilled model is the one a single process trains from the same student and cache at the same
    global batch (2 processes × batch b = 1 process × batch b × 2 accumulation steps)."""
    for var in [v for v in os.environ if v.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("E3PRUNE_CACHE", str(tmp_path / "cache"))
    run = run_pipeline(tmp_path / "run", teacher_shards=2, distill_processes=2)
    run_dir = Path(run["run_dir"])
    tasks = sorted(p.name for p in run_dir.iterdir())
    loops = [t for t in tasks if "-iteration-" in t]
    assert len(loops) == 2 and all((run_dir / t / "teacher-logits").is_dir() for t in loops), tasks
    assert {"join-teacher-cache", "search-mask", "distill", "register"} <= set(tasks)
    parts = sorted(Path(run["storage_prefix"]).glob("work/teacher_logits/*"))
    assert len(parts) == 2
    joined = json.loads((Path(run["joined"]) / "manifest.json").read_text())
    assert sorted(joined["joined"]["parts"]) == sorted(map(str, parts))

    # The 1-task cache of the library, on the data the pipeline sampled.
    (data,) = Path(run["storage_prefix"]).glob("work/sample_data/*")
    params = RunConfig.parse(PIPELINE_SMALL).teacher_params()
    one = tmp_path / "one"
    teacher_logits(
        TeacherLogitsConfig.parse({**params, "model": str(reference_dir), "data": str(data), "output": str(one)})
    )
    reference = json.loads((one / "manifest.json").read_text())
    for split in SPLITS:
        refs = joined["splits"][split]["shards"]
        assert len(refs) == 4
        for ref, rel in zip(refs, reference["splits"][split]["shards"], strict=True):
            assert Path(ref).read_bytes() == (one / rel).read_bytes(), ref
    assert_reads_equal(TeacherTopK(run["joined"]), TeacherTopK(str(one)))

    # The distilled model of the 2-process step against one process, same student, cache and global batch.
    (student,) = Path(run["storage_prefix"]).glob("work/harden_mask/*")
    (two,) = [p for p in Path(run["storage_prefix"]).glob("work/distill/*") if not p.name.endswith(".ckpt")]
    summary = json.loads((two / "distillation.json").read_text())
    assert summary["num_processes"] == 2, summary
    dparams = RunConfig.parse({**PIPELINE_SMALL, "distill_processes": 2}).distill_params()
    single = tmp_path / "one-process"
    distill(
        DistillConfig.parse(
            {
                **dparams,
                "processes": 1,
                "grad_accumulation_steps": 2,
                "student": str(student),
                "teacher_cache": run["joined"],
                "output": str(single),
            }
        )
    )
    rows_two, rows_one = (
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (two, single)
    )
    assert len(rows_two) == len(rows_one) >= 2
    for a, b in zip(rows_two, rows_one, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    w_two, w_one = (load_file(str(d / "model.safetensors")) for d in (two, single))
    assert w_two.keys() == w_one.keys()
    worst = max((w_two[k].float() - w_one[k].float()).abs().max().item() for k in w_two)
    assert worst <= 1e-3, worst
    print(
        f"kfp.local pipeline with teacher_shards=2, distill_processes=2: {run['wall_seconds']:.0f} s; "
        f"max weight difference to 1 process {worst:.2e}"
    )
