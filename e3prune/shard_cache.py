"""A bounded local copy of remote shard files: fetched when read, verified, least recently used evicted.

At 0.5 B tokens a teacher cache is about 34 GB (docs/method.md, Stage 1), more than a pod's disk
should hold for a stream it reads once per epoch. A reader of an ``s3://`` cache therefore keeps
at most ``max_shards`` shard files on local disk: a shard is downloaded when a batch first needs
it, checked against the size and sha256 its writer recorded in the manifest (a shard changed on S3
is refused, never used), and the least recently used one is deleted before another is fetched.
The bound is per reading process (each process of a distillation has its own).

The files live in ``$E3PRUNE_CACHE/shards/reader-<pid>-<random>/``, removed when the reader is
closed or collected; a directory left by a killed process is removed by the next reader.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

from e3prune import storage
from e3prune.errors import E3PruneError

log = logging.getLogger(__name__)

ENV_MAX_SHARDS = "E3PRUNE_TEACHER_CACHE_SHARDS"
DEFAULT_MAX_SHARDS = 4
READER_PREFIX = "reader-"


def max_shards_setting() -> int:
    """Shard files a reading process keeps on local disk: ``$E3PRUNE_TEACHER_CACHE_SHARDS``, default 4."""
    text = os.environ.get(ENV_MAX_SHARDS, "").strip()
    if not text:
        return DEFAULT_MAX_SHARDS
    if not text.isdigit() or int(text) < 1:
        raise E3PruneError(f"must be a whole number of shards, at least 1 (got {text!r})", field=ENV_MAX_SHARDS)
    return int(text)


class ShardCache:
    """Local paths for remote shards, at most ``max_shards`` of them on disk at once."""

    def __init__(self, max_shards: int | None = None, field: str = "teacher_cache"):
        self.max_shards = max_shards_setting() if max_shards is None else max_shards
        if self.max_shards < 1:
            raise E3PruneError(f"must be at least 1 (got {self.max_shards})", field=ENV_MAX_SHARDS)
        self.field = field
        parent = storage.cache_root() / "shards"
        storage.sweep_stale(parent, READER_PREFIX)
        parent.mkdir(parents=True, exist_ok=True)
        self.directory = parent / storage._staging_name(READER_PREFIX)
        self.directory.mkdir()
        self._held: OrderedDict[str, Path] = OrderedDict()  # uri -> local file, least recently used first
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.directory), True)

    def check_disk(self, largest_bytes: int) -> None:
        """Refuse before any download when ``max_shards`` shards of ``largest_bytes`` do not fit the free disk."""
        need = self.max_shards * largest_bytes
        free = shutil.disk_usage(self.directory).free
        if need > free:
            raise E3PruneError(
                f"keeping {self.max_shards} cache shards of up to {largest_bytes / 2**30:.2f} GiB needs "
                f"{need / 2**30:.2f} GiB, but {self.directory} has {free / 2**30:.2f} GiB free; lower "
                f"{ENV_MAX_SHARDS} or point E3PRUNE_CACHE at a larger disk",
                field=self.field,
            )

    def path(self, uri: str, expected: dict[str, Any]) -> Path:
        """A local, verified copy of the object ``uri`` (``expected``: its ``size`` and ``sha256``)."""
        if uri in self._held:
            self._held.move_to_end(uri)
            return self._held[uri]
        while len(self._held) >= self.max_shards:  # evict first: the bound holds during the download too
            _, old = self._held.popitem(last=False)
            old.unlink(missing_ok=True)
        name = hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + uri.rsplit("/", 1)[-1]
        local = storage.download_verified(uri, self.directory / name, expected, field=self.field)
        self._held[uri] = local
        log.debug("fetched %s (%d of at most %d shards on disk)", uri, len(self._held), self.max_shards)
        return local

    def files(self) -> list[Path]:
        """The shard files on local disk now (oldest use first)."""
        return list(self._held.values())

    def close(self) -> None:
        """Delete every local copy (also done when the reader is collected)."""
        self._held.clear()
        self._finalizer()
