"""Recurring compression: the newest release of a source, and whether it was compressed already.

A schedule runs the pipeline on the same ``source_model`` every night; the first step turns it
into the newest concrete release and asks the registry whether that release was compressed (at
this ratio) before. Only a new release runs the rest (``dsl.If`` in the pipeline), so schedules
are idempotent. A release counts as done once its version holds a gate decision; a version
registered without one is reported by :mod:`e3prune.detect` as a pending gate, not as "nothing
new" (docs/operations.md, "When a step fails").

| source | newest release | revision |
|---|---|---|
| hub repo id (``org/name``) | the head of ``source_revision`` (default ``main``) | its commit sha |
| ``s3://bucket/prefix`` holding model folders | the last folder in natural order (``v2`` < ``v10``, ``2026-11-01`` < ``2026-11-15``) that has a ``config.json`` | sha256 of its objects' keys, sizes and ETags |
| ``s3://bucket/prefix`` that is a model | the prefix itself | as above |
| ``models:/<name>`` (MLflow registry) | its highest version (``models:/<name>/<version>`` pins one) | the version's source, resolved as above |
| local directory, ``builtin:reference`` | the directory | sha256 of its content |
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from e3prune import sources, storage
from e3prune.errors import E3PruneError

log = logging.getLogger(__name__)

MLFLOW_PREFIX = "models:/"
SOURCE_TAG = "e3prune.source"
REVISION_TAG = "e3prune.source_revision"
RATIO_TAG = "e3prune.release_ratio"


@dataclass(frozen=True)
class Release:
    source: str  # as the user named it (the model family a schedule follows)
    uri: str  # the concrete model to compress
    revision: str  # immutable


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _s3_release_folders(uri: str) -> list[str]:
    """Immediate sub-prefixes of ``uri`` that hold a ``config.json``."""
    bucket, prefix = storage.split_s3(uri, sources.FIELD)
    client = storage._client()
    with storage._s3_errors(uri, sources.FIELD, "list"):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/", Delimiter="/")
        folders = [p["Prefix"].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]
        return [f for f in folders if storage._exists(client, bucket, f"{f}/config.json")]


def _is_model(uri: str) -> bool:
    bucket, prefix = storage.split_s3(uri, sources.FIELD)
    with storage._s3_errors(uri, sources.FIELD, "read"):
        return storage._exists(storage._client(), bucket, f"{prefix}/config.json")


def newest_release(source: str, revision: str = "", tracking_uri: str | None = None) -> Release:
    """The newest concrete release of ``source`` (or the pinned ``revision``)."""
    if source.startswith(MLFLOW_PREFIX):
        return _mlflow_release(source, revision, tracking_uri)
    if storage.is_s3(source) and not _is_model(source):
        bucket = storage.split_s3(source, sources.FIELD)[0]
        folders = sorted(_s3_release_folders(source), key=lambda f: _natural(f.rsplit("/", 1)[-1]))
        if not folders:
            raise E3PruneError(
                f"{source} is neither a model (no config.json) nor a folder of model versions", field=sources.FIELD
            )
        uri = f"s3://{bucket}/{folders[-1]}"
        resolved = sources.resolve(uri)
        if revision and revision not in (resolved.revision, folders[-1].rsplit("/", 1)[-1]):
            # A pinned release: the folder name or its content revision.
            pinned = [f for f in folders if f.rsplit("/", 1)[-1] == revision]
            if not pinned:
                raise E3PruneError(f"{source} has no release folder {revision!r}", field="source_revision")
            uri = f"s3://{bucket}/{pinned[0]}"
            resolved = sources.resolve(uri)
        log.info("newest release of %s: %s", source, uri)
        return Release(source, uri, resolved.revision)
    resolved = sources.resolve(source, revision)
    return Release(source, source, resolved.revision)


def _mlflow_release(source: str, revision: str, tracking_uri: str | None) -> Release:
    from e3prune.tracking import mlflow_session, resolve_tracking_uri

    parts = source[len(MLFLOW_PREFIX) :].strip("/").split("/")
    name, version = parts[0], (parts[1] if len(parts) > 1 else revision)
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_session(uri, "finding the newest version of the source") as client:
        if version:
            mv = client.get_model_version(name, version)
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise E3PruneError(f"registered model {name!r} has no versions", field=sources.FIELD)
            mv = max(versions, key=lambda v: int(v.version))
    resolved = sources.resolve(mv.source)
    return Release(source, mv.source, resolved.revision)


def release_tags(release: Release, remove_ratio: float) -> dict[str, str]:
    """The version tags that identify one compression of one release."""
    return {SOURCE_TAG: release.source, REVISION_TAG: release.revision, RATIO_TAG: repr(float(remove_ratio))}


def compressed_version(model_name: str, release: Release, remove_ratio: float, tracking_uri: str | None = None):
    """The registered version that already holds this release at this ratio, or ``None``.

    Its tags say whether the gate decided on it (:func:`e3prune.gate.gate_decision`).
    """
    from e3prune.registry import find_versions

    found = find_versions(model_name, release_tags(release, remove_ratio), tracking_uri)  # none if no such model
    return found[0] if found else None
