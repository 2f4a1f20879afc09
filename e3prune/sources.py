"""Where a source model comes from, and which immutable revision of it a run compresses.

A pipeline parameter names the source as one string (docs/architecture.md, "The flow"):

| form | example | revision (immutable) |
|---|---|---|
| ``builtin:reference`` | the model shipped in :mod:`e3prune.reference` | sha256 of its files |
| local directory | ``/models/llama-3.1-8b`` | sha256 of its files' content |
| ``s3://bucket/prefix`` | ``s3://models/qwen3-8b/2026-11-01`` | sha256 over (key, size, ETag) of its objects |
| hub repo id | ``Qwen/Qwen3-8B`` | the commit sha the requested revision points to |

Resolving a moving name ("main", a folder that is overwritten) to an immutable revision first
is what lets Kubeflow's cache serve a step only when the source really is the same: every step
after the first receives the resolved revision as an input, so a new release changes every
cache key (``docs/operations.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from e3prune import storage
from e3prune.errors import E3PruneError

log = logging.getLogger(__name__)

BUILTIN_REFERENCE = "builtin:reference"
FIELD = "source_model"
ALLOWED = "builtin:reference, a local model directory, s3://bucket/prefix, or a Hugging Face hub id (org/name)"


@dataclass(frozen=True)
class ResolvedSource:
    uri: str  # as the user gave it
    kind: str  # builtin | local | s3 | hub
    revision: str  # immutable: content sha256, or the hub commit sha


def source_kind(uri: str) -> str:
    if uri == BUILTIN_REFERENCE:
        return "builtin"
    if storage.is_s3(uri):
        return "s3"
    if Path(uri).expanduser().exists() or uri.startswith(("/", ".", "~")):
        return "local"
    parts = uri.split("/")
    if len(parts) == 2 and all(parts) and not uri.startswith("builtin:") and ":" not in uri:
        return "hub"
    raise E3PruneError(f"{uri!r} is not a model source; allowed: {ALLOWED}", field=FIELD)


def _files_digest(root: Path) -> str:
    """sha256 over every file's relative path and content: equal digests mean equal checkpoints."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(storage.file_digest(p)["sha256"].encode())
    return h.hexdigest()


def _s3_objects(uri: str) -> list[dict]:
    bucket, prefix = storage.split_s3(uri, FIELD)
    client = storage._client()
    with storage._s3_errors(uri, FIELD, "list"):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        objects = [o for page in pages for o in page.get("Contents", [])]
    if not any(o["Key"].endswith("/config.json") and o["Key"].count("/") == prefix.count("/") + 1 for o in objects):
        raise E3PruneError(f"{uri} is not a model: it has no config.json directly under it", field=FIELD)
    return objects


def _s3_revision(objects: list[dict]) -> str:
    h = hashlib.sha256()
    for o in sorted(objects, key=lambda o: o["Key"]):
        h.update(f"{o['Key']}\0{o['Size']}\0{o['ETag']}\n".encode())
    return h.hexdigest()


def resolve(uri: str, revision: str = "") -> ResolvedSource:
    """The immutable revision of ``uri`` without downloading weights (except content hashes of local files).

    ``revision`` pins it: for the hub any branch, tag or commit (resolved to the commit sha);
    elsewhere it is checked against the computed one, so a run never compresses a source that
    changed under its name.
    """
    kind = source_kind(uri)
    if kind == "hub":
        return ResolvedSource(uri, kind, _hub_commit(uri, revision or "main"))
    if kind == "s3":
        found = _s3_revision(_s3_objects(uri))
    else:
        root = _local_root(uri, kind)
        from e3prune.model_io import load_config

        load_config(root, FIELD)  # a directory that is not a supported model fails now, not in a later step
        found = _files_digest(root)
    if revision and revision != found:
        raise E3PruneError(
            f"{uri} is at revision {found[:12]}…, not the requested {revision[:12]}…: the source changed; "
            "leave source_revision empty to compress what is there now",
            field="source_revision",
        )
    return ResolvedSource(uri, kind, found)


def _local_root(uri: str, kind: str) -> Path:
    if kind == "builtin":
        from e3prune.reference import MODEL_DIR

        return MODEL_DIR
    p = Path(uri).expanduser()
    if not p.is_dir():
        raise E3PruneError(f"{p} is not a directory; allowed: {ALLOWED}", field=FIELD)
    return p


def fetch(uri: str, revision: str) -> Path:
    """A local directory holding ``uri`` at ``revision`` (downloaded into the cache when remote)."""
    kind = source_kind(uri)
    if kind in ("builtin", "local"):
        return _local_root(uri, kind)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(uri, revision=revision))
        except Exception as exc:  # hub errors are many classes; all mean "cannot fetch this revision"
            raise E3PruneError(f"cannot download {uri}@{revision} from the hub: {exc}", field=FIELD) from None
    return _fetch_s3(uri, revision)


def _fetch_s3(uri: str, revision: str) -> Path:
    """Download an S3 model prefix (no marker needed: sources are written by other tools).

    Objects are checked against their listed sizes and, for single-part uploads, their MD5 ETags;
    the whole listing must still hash to ``revision``.
    """
    objects = _s3_objects(uri)
    found = _s3_revision(objects)
    if revision and found != revision:
        raise E3PruneError(f"{uri} changed while the run was going (revision {found[:12]}…)", field=FIELD)
    bucket, prefix = storage.split_s3(uri, FIELD)
    cached = storage.cache_root() / "sources" / found
    done = cached / ".complete"
    if done.is_file():
        return cached
    client = storage._client()
    cached.mkdir(parents=True, exist_ok=True)
    with storage._s3_errors(uri, FIELD, "download"):
        for o in objects:
            rel = o["Key"][len(prefix) + 1 :]
            target = cached / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, o["Key"], str(target), Config=storage._transfer_config())
            etag = o["ETag"].strip('"')
            if target.stat().st_size != o["Size"] or ("-" not in etag and _md5(target) != etag):
                raise E3PruneError(f"{uri}/{rel} did not download intact; retry", field=FIELD)
    done.write_text(json.dumps({"uri": uri, "revision": found}))
    log.info("downloaded %d objects of %s into %s", len(objects), uri, cached)
    return cached


def _md5(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _hub_commit(repo_id: str, revision: str) -> str:
    from huggingface_hub import HfApi

    try:
        info = HfApi(token=os.environ.get("HF_TOKEN") or None).model_info(repo_id, revision=revision)
    except Exception as exc:
        raise E3PruneError(
            f"cannot resolve {repo_id}@{revision} on the Hugging Face hub: {exc}; check the id, the revision, "
            "HF_TOKEN for gated models, and HF_ENDPOINT / network access",
            field=FIELD,
        ) from None
    return str(info.sha)
