"""storage: outputs are complete or absent, inputs are verified; locally and on a real S3 server."""

import json
import os
from pathlib import Path

import pytest

from e3prune import storage
from e3prune.errors import E3PruneError


def _write_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)) * 8, "sub/deeper/c.json": b'{"x": 1}'}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _record_calls(monkeypatch) -> list[tuple[str, str]]:
    """Patch storage's client factory so every S3 operation it makes is recorded as (operation, key)."""
    calls: list[tuple[str, str]] = []
    make = storage._client

    def recording_client():
        c = make()

        def record(params, model, **_):
            calls.append((model.name, params.get("Key", "")))

        c.meta.events.register("provide-client-params.s3.*", record)
        return c

    monkeypatch.setattr(storage, "_client", recording_client)
    return calls


def test_is_s3_and_split():
    assert storage.is_s3("s3://b/p") and not storage.is_s3("/tmp/x") and not storage.is_s3("runs/s3://x")
    assert storage.split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    for bad in ("s3://bucket", "s3://bucket/", "s3:///prefix"):
        with pytest.raises(E3PruneError) as err:
            storage.split_s3(bad)
        assert err.value.field == "output" and "bucket and a prefix" in str(err.value)


def test_local_round_trip(no_partial_dirs):
    out = no_partial_dirs / "out"
    storage.check_output(str(out))
    with storage.output_dir(str(out)) as d:
        files = _write_tree(d)
        assert not out.exists()  # nothing visible until the step succeeded
    assert storage.input_dir(str(out)) == out
    assert _read_tree(out) == files


def test_local_failed_step_leaves_nothing(no_partial_dirs):
    out = no_partial_dirs / "out"
    with pytest.raises(RuntimeError, match="step failed"):
        with storage.output_dir(str(out)) as d:
            _write_tree(d)
            raise RuntimeError("step failed")
    assert not out.exists()


def test_local_input_errors(tmp_path):
    with pytest.raises(E3PruneError) as err:
        storage.input_dir(str(tmp_path / "missing"), field="teacher_logits")
    assert err.value.field == "teacher_logits" and "does not exist" in str(err.value)
    (tmp_path / "f").write_text("x")
    with pytest.raises(E3PruneError, match="is a file"):
        storage.input_dir(str(tmp_path / "f"))


def test_s3_round_trip_marker_last_and_cache_reused(s3, monkeypatch, tmp_path):
    # A file above the multipart threshold exercises the multipart path on the real server.
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD_BYTES", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK_BYTES", 5 * 1024 * 1024)
    calls = _record_calls(monkeypatch)
    uri = s3.uri("runs/data")
    storage.check_output(uri)
    with storage.output_dir(uri) as d:
        files = _write_tree(d)
        files["big.bin"] = os.urandom(6 * 1024 * 1024 + 17)
        (d / "big.bin").write_bytes(files["big.bin"])

    writes = [
        (op, key)
        for op, key in calls
        if op in ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
    ]
    assert writes[-1] == ("PutObject", s3.key("runs/data/_COMPLETE.json"))
    assert ("CreateMultipartUpload", s3.key("runs/data/big.bin")) in writes
    assert {key for _, key in writes[:-1]} == {s3.key(f"runs/data/{rel}") for rel in files}
    marker = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=s3.key("runs/data/_COMPLETE.json"))["Body"].read())
    assert set(marker) == set(files) and marker["a.txt"]["size"] == len(files["a.txt"])

    local = storage.input_dir(uri)
    assert local == Path(os.environ["E3PRUNE_CACHE"]) / "s3" / s3.bucket / s3.key("runs/data")
    assert {k: v for k, v in _read_tree(local).items() if k not in (storage.MARKER, storage.VERIFIED)} == files

    calls.clear()
    assert storage.input_dir(uri) == local
    assert [op for op, _ in calls] == ["GetObject"] and calls[0][1].endswith("_COMPLETE.json")  # marker only


def test_s3_tampered_object_is_refused(s3):
    uri = s3.uri("published")
    with storage.output_dir(uri) as d:
        files = _write_tree(d)
    # Same size, one byte changed: only the sha256 can tell.
    tampered = bytearray(files["sub/b.bin"])
    tampered[100] ^= 0xFF
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("published/sub/b.bin"), Body=bytes(tampered))
    with pytest.raises(E3PruneError) as err:
        storage.input_dir(uri)
    assert err.value.field == "data" and "sub/b.bin" in str(err.value) and "does not match" in str(err.value)
    cache = Path(os.environ["E3PRUNE_CACHE"]) / "s3" / s3.bucket / s3.prefix
    assert not (cache / "published").exists()
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]


def test_s3_failed_step_uploads_nothing(s3):
    uri = s3.uri("failed")
    with pytest.raises(RuntimeError, match="step failed"):
        with storage.output_dir(uri) as d:
            _write_tree(d)
            raise RuntimeError("step failed")
    assert s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=s3.key("failed/"))["KeyCount"] == 0
    with pytest.raises(E3PruneError, match="incomplete or missing: no _COMPLETE.json marker"):
        storage.input_dir(uri)


def test_s3_missing_marker_is_a_clear_error(s3):
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("half/a.txt"), Body=b"alpha")
    with pytest.raises(E3PruneError) as err:
        storage.input_dir(s3.uri("half"), field="teacher_logits")
    assert err.value.field == "teacher_logits" and "incomplete or missing: no _COMPLETE.json marker" in str(err.value)
    # A stray object without a marker also blocks a new output there unless overwrite.
    with pytest.raises(E3PruneError, match="no _COMPLETE.json marker") as err:
        storage.check_output(s3.uri("half"))
    assert err.value.field == "output"


def test_s3_existing_output_needs_overwrite_and_is_replaced_cleanly(s3):
    uri = s3.uri("run")
    with storage.output_dir(uri) as d:
        _write_tree(d)
    with pytest.raises(E3PruneError) as err:
        with storage.output_dir(uri) as d:
            raise AssertionError("the body must not run when the output is refused")
    assert err.value.field == "output" and "already holds a complete output" in str(err.value)

    with storage.output_dir(uri, overwrite=True) as d:
        (d / "only.txt").write_text("new")
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=s3.key("run/"))["Contents"]}
    assert keys == {s3.key("run/only.txt"), s3.key("run/_COMPLETE.json")}  # the old version's files are gone
    assert (storage.input_dir(uri) / "only.txt").read_text() == "new"


def test_s3_missing_bucket_and_bad_credentials(s3, monkeypatch):
    with pytest.raises(E3PruneError) as err:
        storage.check_output("s3://no-such-bucket-e3prune/x")
    assert err.value.field == "output" and "does not exist" in str(err.value)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(E3PruneError) as err:
        storage.check_output(s3.uri("x"))
    assert err.value.field == "output" and "wrong-secret-value" not in str(err.value)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(E3PruneError, match="no S3 credentials"):
        storage.input_dir(s3.uri("x"))


def test_read_file_takes_one_verified_file_without_the_rest(s3, tmp_path):
    uri = s3.uri("ckpt")
    with storage.output_dir(uri) as out:
        (out / "pruning.json").write_text('{"kept_layers": [0, 2]}')
        (out / "model.safetensors").write_bytes(b"\0" * 4096)
    assert json.loads(storage.read_file(uri, "pruning.json", field="exported")) == {"kept_layers": [0, 2]}
    assert not (storage.cache_root() / "s3").exists()  # nothing downloaded besides that one object
    with pytest.raises(E3PruneError, match="has no metrics.jsonl") as err:
        storage.read_file(uri, "metrics.jsonl", field="exported")
    assert err.value.field == "exported"
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("ckpt/pruning.json"), Body=b"{}")
    with pytest.raises(E3PruneError, match="does not match"):
        storage.read_file(uri, "pruning.json")
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("half/pruning.json"), Body=b"{}")
    with pytest.raises(E3PruneError, match="_COMPLETE.json"):
        storage.read_file(s3.uri("half"), "pruning.json")
    local = tmp_path / "local"
    local.mkdir()
    (local / "a.txt").write_text("x")
    assert storage.read_file(str(local), "a.txt") == b"x"


def test_keys_that_climb_out_of_their_prefix_are_refused(s3):
    for bad in ("s3://b/x/../../../../elsewhere/data", "s3://b/x/./y", "s3://b/x//y"):
        with pytest.raises(E3PruneError) as err:
            storage.split_s3(bad, field="data")
        assert err.value.field == "data" and "'..' part" in str(err.value)
    uri = s3.uri("climb")
    with storage.output_dir(uri) as d:
        _write_tree(d)
    marker = {"../../outside.txt": {"size": 1, "sha256": "0" * 64}}
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("climb/_COMPLETE.json"), Body=json.dumps(marker).encode())
    with pytest.raises(E3PruneError) as err:
        storage.input_dir(uri)
    assert "'..' part" in str(err.value)
    assert not list(Path(os.environ["E3PRUNE_CACHE"]).rglob("outside.txt"))


def test_a_cached_copy_corrupted_in_place_is_detected_and_downloaded_again(s3):
    """Same size, one byte flipped in the local cache after it was verified: hashed again, not trusted."""
    uri = s3.uri("cached")
    with storage.output_dir(uri) as d:
        files = _write_tree(d)
    local = storage.input_dir(uri)
    target = local / "sub" / "b.bin"
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    assert storage.input_dir(uri) == local
    assert (local / "sub" / "b.bin").read_bytes() == files["sub/b.bin"]  # the good bytes, downloaded again


def test_a_deleted_object_is_named_in_the_error(s3):
    uri = s3.uri("deleted")
    with storage.output_dir(uri) as d:
        _write_tree(d)
    s3.client.delete_object(Bucket=s3.bucket, Key=s3.key("deleted/sub/deeper/c.json"))
    with pytest.raises(E3PruneError) as err:
        storage.input_dir(uri, field="data")
    assert err.value.field == "data" and f"{uri}/sub/deeper/c.json" in str(err.value) and "not found" in str(err.value)


def test_staging_left_by_a_killed_process_is_swept(tmp_path, s3):
    """A real SIGKILL mid-write leaves a staging directory; the next write of that output removes it."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    out = tmp_path / "out"
    script = (
        "import sys, time\nfrom e3prune import storage\n"
        "with storage.output_dir(sys.argv[1]) as d:\n    (d / 'half').write_text('x')\n    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    for target in (str(out), s3.uri("killed")):
        proc = subprocess.Popen([sys.executable, "-c", script, target], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    leftovers = [*tmp_path.glob(".out.partial-*"), *Path(tempfile.gettempdir()).glob(f"e3prune-upload-{proc.pid}-*")]
    assert len(leftovers) == 2, leftovers
    time.sleep(0.1)
    with storage.output_dir(str(out)) as d:
        (d / "done").write_text("ok")
    with storage.output_dir(s3.uri("again")) as d:
        (d / "done").write_text("ok")
    assert not [p for p in leftovers if p.exists()]
    assert (out / "done").read_text() == "ok"
