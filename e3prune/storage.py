"""Every read and write of a step's input or output URI: a local directory or ``s3://bucket/prefix``.

A step never talks to S3 itself. It calls :func:`check_output` before its heavy work, writes its
files into the local directory that :func:`output_dir` yields, and reads its inputs through
:func:`input_dir`. The contract that makes outputs trustworthy:

- **Local**: the output is staged in a hidden sibling directory and renamed into place at the
  end (:func:`staged_output_dir`), so it is complete or absent.
- **S3**: an object store has no rename, so completeness is a marker. Every file is uploaded
  first; ``<prefix>/_COMPLETE.json`` — the size and sha256 of every file — is written last. A
  prefix without the marker is an interrupted or failed upload, and readers refuse it. Readers
  also verify every downloaded file against the marker, so an object changed after publication
  is caught instead of silently feeding a later stage.

Endpoint and credentials come only from the environment (boto3 reads ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), so
they never pass through a configuration that gets logged or stored in a manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from e3prune.errors import E3PruneError

log = logging.getLogger(__name__)

MARKER = "_COMPLETE.json"
# Files above this size go up and down in parts: one lost connection then costs one part, not
# the whole file, and S3's 5 GiB single-PUT limit never applies. 64 MiB parts keep the part
# count of a 100 GiB teacher-logits cache under S3's 10 000-part limit.
MULTIPART_THRESHOLD_BYTES = 64 * 1024 * 1024
MULTIPART_CHUNK_BYTES = 64 * 1024 * 1024
# Bounded: a flaky endpoint is retried a few times with backoff, a dead one fails in seconds.
RETRY_ATTEMPTS = 5
HASH_BLOCK_BYTES = 1 << 20


def is_s3(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names an S3 location (``s3://bucket/prefix``) rather than a local path."""
    return str(uri).startswith("s3://")


def split_s3(uri: str, field: str = "output") -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; a prefix is required (never a bucket root)."""
    bucket, _, prefix = str(uri)[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise E3PruneError(f"{uri!r} needs a bucket and a prefix, like s3://bucket/runs/data", field=field)
    check_relative_key(prefix, uri, field)
    return bucket, prefix


def check_relative_key(key: str, uri: str, field: str) -> None:
    """A key (or a path in a marker) must stay below its prefix: no ``..``, ``.``, empty or absolute parts.

    The local cache mirrors keys as paths, so ``s3://b/x/../../elsewhere`` would otherwise land
    outside the cache root.
    """
    parts = key.split("/")
    if key.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in key:
        raise E3PruneError(f"{uri!r}: {key!r} has an empty, '.' or '..' part; give a plain key", field=field)


def cache_root() -> Path:
    """Where downloaded inputs are kept: ``$E3PRUNE_CACHE``, default ``~/.cache/e3prune``."""
    return Path(os.environ.get("E3PRUNE_CACHE") or "~/.cache/e3prune").expanduser()


def _client():
    """An S3 client configured for S3-compatible servers; endpoint and credentials from the environment."""
    import boto3
    from botocore.config import Config

    # Path-style addressing (endpoint/bucket/key) works with MinIO, SeaweedFS, Ceph and AWS alike;
    # virtual-host style needs wildcard DNS that in-cluster servers rarely have.
    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": RETRY_ATTEMPTS, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
    )
    # A new session each time: boto3's default session caches the credentials it first found, so
    # a process whose environment changes (rotated keys, tests) would keep signing with stale ones.
    return boto3.session.Session().client("s3", config=config)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD_BYTES, multipart_chunksize=MULTIPART_CHUNK_BYTES, max_concurrency=4
    )


@contextmanager
def _s3_errors(uri: str, field: str, action: str) -> Iterator[None]:
    """Turn botocore's errors into one :class:`E3PruneError` that says what to check.

    botocore's messages name the operation, the bucket and the error code; they never contain
    the secret key, so they are safe to pass on.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise E3PruneError(
            f"cannot {action} {uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", field=field
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        hint = {
            "403": "access denied: check the credentials and the bucket policy",
            "AccessDenied": "access denied: check the credentials and the bucket policy",
            "InvalidAccessKeyId": "the access key is not known to the server: check AWS_ACCESS_KEY_ID",
            "SignatureDoesNotMatch": "the signature does not match: check AWS_SECRET_ACCESS_KEY",
            "404": "not found",
            "NoSuchBucket": "the bucket does not exist",
        }.get(code, str(exc))
        raise E3PruneError(f"cannot {action} {uri}: {hint}", field=field) from None
    except BotoCoreError as exc:
        # Connection refused, DNS, timeouts after the bounded retries: say which endpoint variable to check.
        raise E3PruneError(
            f"cannot {action} {uri}: {exc}; check AWS_ENDPOINT_URL and that the server is reachable", field=field
        ) from None


def _exists(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def _check_bucket(client, bucket: str, field: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
            raise E3PruneError(
                f"bucket {bucket!r} does not exist; create it first or fix the URI", field=field
            ) from None
        raise


def _keys(client, bucket: str, prefix: str) -> list[str]:
    """Every key under ``prefix/`` (the slash keeps ``runs/a`` from matching ``runs/ab``)."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def read_json_manifest(uri: str, path: Path, field: str, hint: str) -> dict[str, Any]:
    """The JSON object at ``path`` (an output's manifest), or one error that says what to do (``hint``)."""
    if not path.is_file():
        raise E3PruneError(f"{uri} has no {path.name}: it is not what this step reads; {hint}", field=field)
    return parse_json_manifest(uri, path.name, path.read_bytes(), field, hint)


def read_manifest_only(uri: str, name: str, field: str, hint: str) -> dict[str, Any]:
    """The manifest ``name`` of a complete output without downloading the rest (verified against the marker on S3)."""
    if not is_s3(uri):
        return read_json_manifest(uri, input_dir(uri, field) / name, field, hint)
    if name not in read_marker(uri, field):
        raise E3PruneError(f"{uri} has no {name}: it is not what this step reads; {hint}", field=field)
    return parse_json_manifest(uri, name, read_file(uri, name, field), field, hint)


def parse_json_manifest(uri: str, name: str, text: bytes, field: str, hint: str) -> dict[str, Any]:
    """The JSON object in ``text`` (the manifest ``name`` of ``uri``), or one error that says what to do."""
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise E3PruneError(f"{uri}/{name} is not valid JSON ({exc}); {hint}", field=field) from None
    if not isinstance(manifest, dict):
        raise E3PruneError(f"{uri}/{name} is not a manifest (not a JSON object); {hint}", field=field)
    return manifest


def is_complete(uri: str, field: str = "output") -> bool:
    """Whether ``uri`` holds a complete output: its marker on S3; locally, the directory a staged
    output was renamed into (it exists only once complete)."""
    if not is_s3(uri):
        p = Path(uri)
        return p.is_dir() and any(p.iterdir())
    bucket, prefix = split_s3(uri, field)
    client = _client()
    with _s3_errors(uri, field, "look up"):
        return _exists(client, bucket, f"{prefix}/{MARKER}")


def check_output(uri: str, overwrite: bool = False, field: str = "output") -> None:
    """Check, before any heavy work, that ``uri`` can receive a new output.

    Local: see :func:`check_output_dir`. S3: the bucket exists and is reachable
    with the environment's credentials, and the prefix holds neither a complete output nor stray
    objects (an interrupted upload, or someone else's data) unless ``overwrite``.
    """
    if not is_s3(uri):
        check_output_dir(uri, overwrite, field)
        return
    bucket, prefix = split_s3(uri, field)
    client = _client()
    with _s3_errors(f"s3://{bucket}", field, "reach bucket"):
        _check_bucket(client, bucket, field)
    with _s3_errors(uri, field, "list"):
        if overwrite:
            return
        if _exists(client, bucket, f"{prefix}/{MARKER}"):
            raise E3PruneError(
                f"{uri} already holds a complete output ({MARKER}); choose a new prefix or pass overwrite", field=field
            )
        stray = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/", MaxKeys=1).get("KeyCount", 0)
        if stray:
            raise E3PruneError(
                f"{uri} holds objects but no {MARKER} marker (an interrupted upload, or other data); "
                "choose a new prefix or pass overwrite to replace them",
                field=field,
            )


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of one file, read in blocks so large shards need no memory."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK_BYTES):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def directory_digest(root: Path) -> dict[str, dict[str, Any]]:
    """The marker's content: relative posix path -> ``{"size", "sha256"}`` for every file under ``root``."""
    return {p.relative_to(root).as_posix(): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def output_dir(uri: str, overwrite: bool = False, field: str = "output") -> Iterator[Path]:
    """Yield a local directory for a step to write into; publish it to ``uri`` only on success.

    On an exception nothing is published: a local ``uri`` is left untouched, an S3 prefix gets
    no upload and no marker.
    """
    if not is_s3(uri):
        check_output_dir(uri, overwrite, field)  # first, so a refusal names the caller's field
        with staged_output_dir(uri, overwrite) as staging:
            yield staging
        return
    check_output(uri, overwrite, field)
    sweep_stale(Path(tempfile.gettempdir()), "e3prune-upload-")
    staging = Path(tempfile.mkdtemp(prefix=_staging_name("e3prune-upload-") + "-"))
    try:
        yield staging
        _publish(staging, uri, field)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, uri: str, field: str) -> None:
    """Upload every file, remove what an older version left, then write the marker last."""
    bucket, prefix = split_s3(uri, field)
    digest = directory_digest(staging)
    client = _client()
    transfer = _transfer_config()
    with _s3_errors(uri, field, "upload to"):
        # An overwritten output must stop looking complete before any of its files change.
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{MARKER}")
        for rel in digest:
            client.upload_file(str(staging / rel), bucket, f"{prefix}/{rel}", Config=transfer)
        wanted = {f"{prefix}/{rel}" for rel in digest}
        stale = [k for k in _keys(client, bucket, prefix) if k not in wanted and k != f"{prefix}/{MARKER}"]
        for start in range(0, len(stale), 1000):  # DeleteObjects takes at most 1000 keys a call
            objects = [{"Key": k} for k in stale[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
        client.put_object(
            Bucket=bucket,
            Key=f"{prefix}/{MARKER}",
            Body=json.dumps(digest, indent=1, sort_keys=True).encode(),
            ContentType="application/json",
        )
    log.info("published %d files to %s", len(digest), uri)


def input_dir(uri: str, field: str = "data") -> Path:
    """A local directory holding the complete, verified content of ``uri``.

    Local: the path itself. S3: the prefix must carry ``_COMPLETE.json``; its files are
    downloaded into ``$E3PRUNE_CACHE/s3/<bucket>/<prefix>`` and each is checked against the
    marker's size and sha256. A cached copy whose marker equals the published one is reused
    without downloading again.
    """
    if not is_s3(uri):
        p = Path(uri).expanduser()
        if not p.exists():
            raise E3PruneError(f"{p} does not exist; give the output directory of an earlier step", field=field)
        if not p.is_dir():
            raise E3PruneError(f"{p} is a file; give the output directory of an earlier step", field=field)
        return p
    bucket, prefix = split_s3(uri, field)
    client = _client()
    with _s3_errors(uri, field, "read"):
        marker = _read_marker(client, bucket, prefix, uri, field)
        cached = cache_root() / "s3" / bucket / prefix
        if _cached_copy_matches(cached, marker):
            log.info("using the cached copy of %s at %s", uri, cached)
            return cached
        _download(client, bucket, prefix, marker, cached, uri, field)
    return cached


def read_marker(uri: str, field: str = "data") -> dict[str, dict[str, Any]]:
    """The ``_COMPLETE.json`` of an S3 output (what it holds: path -> size, sha256); an error when absent."""
    bucket, prefix = split_s3(uri, field)
    with _s3_errors(uri, field, "read"):
        return _read_marker(_client(), bucket, prefix, uri, field)


def read_file(uri: str, rel: str, field: str = "data") -> bytes:
    """One file of a complete output without downloading the rest (a 16 GB checkpoint's ``pruning.json``).

    Local: read from the directory. S3: the prefix must carry its marker, the file must be listed
    in it, and its size and sha256 must match.
    """
    if not is_s3(uri):
        path = input_dir(uri, field) / rel
        if not path.is_file():
            raise E3PruneError(f"{uri} has no {rel}", field=field)
        return path.read_bytes()
    marker = read_marker(uri, field)
    if rel not in marker:
        raise E3PruneError(f"{uri} has no {rel} (not in its {MARKER})", field=field)
    bucket, prefix = split_s3(uri, field)
    with _s3_errors(uri, field, "read"):
        body = _client().get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read()
    if len(body) != marker[rel]["size"] or hashlib.sha256(body).hexdigest() != marker[rel]["sha256"]:
        raise E3PruneError(f"{uri}/{rel} does not match {MARKER}: it changed after it was published", field=field)
    return body


def download_verified(uri: str, target: Path, expected: dict[str, Any], field: str = "data") -> Path:
    """One object ``s3://bucket/key`` into ``target``, checked against ``expected`` (``{"size", "sha256"}``).

    The bytes land in a hidden sibling first and are renamed to ``target`` only once their size and
    sha256 match, so ``target`` never holds an unverified or partial file. A mismatch (an object
    changed or replaced after it was published) is an error and leaves nothing behind.
    """
    bucket, key = split_s3(uri, field)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _s3_errors(uri, field, "download"):
            _client().download_file(bucket, key, str(partial), Config=_transfer_config())
        got = file_digest(partial)
        if got != {"size": expected["size"], "sha256": expected["sha256"]}:
            raise E3PruneError(
                f"{uri} does not match what its writer recorded (size {got['size']} vs {expected['size']}, sha256 "
                f"{got['sha256'][:12]}… vs {expected['sha256'][:12]}…): the object changed after it was published; "
                "re-run the step that wrote it",
                field=field,
            )
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _read_marker(client, bucket: str, prefix: str, uri: str, field: str) -> dict[str, dict[str, Any]]:
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{MARKER}")["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise E3PruneError(
                f"{uri} is incomplete or missing: no {MARKER} marker (the step that writes it failed, "
                "is still running, or the URI is wrong)",
                field=field,
            ) from None
        raise
    try:
        marker = json.loads(body)
        if not isinstance(marker, dict) or not all(
            isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in marker.values()
        ):
            raise ValueError("expected {path: {size, sha256}}")
    except ValueError as exc:
        raise E3PruneError(f"{uri}/{MARKER} is not a valid marker: {exc}", field=field) from None
    return marker


VERIFIED = ".verified.json"  # per cached file: the size and mtime it had when its sha256 was checked


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _write_stamp(directory: Path, marker: dict[str, dict[str, Any]]) -> None:
    stamps = {rel: _file_stamp(directory / rel) for rel in marker}
    (directory / VERIFIED).write_text(json.dumps(stamps, sort_keys=True))


def _cached_copy_matches(cached: Path, marker: dict[str, dict[str, Any]]) -> bool:
    """A cached copy is trusted when it was verified against this very marker and has not changed since.

    Each file's sha256 was checked when it was downloaded, and its size and modification time
    then were recorded beside it. A file whose size or mtime differs now (a write, a truncation, a
    same-size overwrite) is hashed again; one that no longer matches the marker makes the whole
    copy untrusted, so it is downloaded again. Re-hashing gigabytes of unchanged shards on every
    read would cost more than the check is worth.
    """
    local_marker = cached / MARKER
    try:
        if json.loads(local_marker.read_text()) != marker:
            return False
        stamps = json.loads((cached / VERIFIED).read_text())
    except (OSError, ValueError):
        return False
    for rel, expected in marker.items():
        path = cached / rel
        if not path.is_file():
            return False
        if stamps.get(rel) != _file_stamp(path):
            if file_digest(path) != {"size": expected["size"], "sha256": expected["sha256"]}:
                log.warning("the cached copy of %s changed after it was verified; downloading it again", path)
                return False
            stamps[rel] = _file_stamp(path)
            (cached / VERIFIED).write_text(json.dumps(stamps, sort_keys=True))
    return True


def _download(client, bucket: str, prefix: str, marker: dict, cached: Path, uri: str, field: str) -> None:
    """Download into a staging sibling, verify every file, then swap it into place."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(cached.parent, f".{cached.name}.partial-")
    staging = cached.parent / _staging_name(f".{cached.name}.partial-")
    staging.mkdir()
    try:
        transfer = _transfer_config()
        for rel, expected in marker.items():
            check_relative_key(rel, f"{uri}/{MARKER}", field)
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with _s3_errors(f"{uri}/{rel}", field, "download"):  # names the file, e.g. a deleted object
                client.download_file(bucket, f"{prefix}/{rel}", str(target), Config=transfer)
            got = file_digest(target)
            if got != {"size": expected["size"], "sha256": expected["sha256"]}:
                raise E3PruneError(
                    f"{uri}/{rel} does not match {MARKER} (size {got['size']} vs {expected['size']}, "
                    f"sha256 {got['sha256'][:12]}… vs {expected['sha256'][:12]}…): the object changed after it was "
                    "published; re-run the step that wrote it",
                    field=field,
                )
        (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
        _write_stamp(staging, marker)
        old = None
        if cached.exists():
            old = cached.parent / _staging_name(f".{cached.name}.old-")
            cached.rename(old)
        try:
            staging.rename(cached)
        except OSError:
            # Another process sharing the cache finished the same download first: use its copy.
            if not _cached_copy_matches(cached, marker):
                raise
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("downloaded and verified %d files of %s into %s", len(marker), uri, cached)


# ---------------------------------------------------------------- local outputs, staged


def _staging_name(prefix: str) -> str:
    """A staging name that records its owner: ``<prefix><pid>-<random>``, so leftovers can be swept."""
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner_is_gone(name: str, prefix: str) -> bool:
    pid_text = name[len(prefix) :].split("-", 1)[0]
    if not pid_text.isdigit():
        return True  # an older, pid-less leftover
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_stale(directory: Path, prefix: str) -> list[Path]:
    """Remove ``directory/<prefix>*`` staging leftovers whose owning process has died (a kill mid-write)."""
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.glob(f"{prefix}*"):
        if path.is_dir() and _owner_is_gone(path.name, prefix):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.info("removed %s, left behind by a killed process", path)
    return removed


def check_output_dir(path: str | os.PathLike, overwrite: bool, field: str = "output") -> Path:
    """Check, before any heavy work, that ``path`` can be written as a new output directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise E3PruneError(f"{p} is a file; give a directory path", field=field)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise E3PruneError(f"{p} exists and is not empty; choose a new directory or pass overwrite", field=field)
    parent = p.parent if p.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise E3PruneError(f"cannot create {parent}: {exc.strerror}", field=field) from None
    if not os.access(parent, os.W_OK):
        raise E3PruneError(f"{parent} is not writable", field=field)
    return p


@contextmanager
def staged_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On failure the temporary directory is removed and ``path`` is untouched, so a crashed or
    rejected run never leaves an output directory that looks complete.
    """
    final = check_output_dir(path, overwrite)
    sweep_stale(final.parent, f".{final.name}.partial-")
    sweep_stale(final.parent, f".{final.name}.old-")
    tmp = final.parent / _staging_name(f".{final.name}.partial-")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / _staging_name(f".{final.name}.old-")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
