"""Where a step writes its large outputs, and where the next step finds them.

Large data (token shards, the teacher cache, checkpoints) must not be copied through every
KFP artifact. With ``storage_prefix`` set (``s3://bucket/prefix`` on a cluster, a
directory locally) a step writes to ``<prefix>/work/<step>/<stamp>-<id>`` and its KFP artifact
only records that URI in its metadata (``uri``); the next step reads it from there. Without a
prefix the step writes into the artifact's own path (small models, quick trials).

The location is fresh for every execution rather than derived from the run id, so Kubeflow's
cache can reuse an artifact across runs: a cache hit hands over the artifact, pointer and all.
"""

from __future__ import annotations

import time
import uuid

URI_KEY = "uri"


def work_uri(storage_prefix: str, step: str, artifact_path: str) -> str:
    """The URI a step writes its large output to."""
    if not storage_prefix:
        return artifact_path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{storage_prefix.rstrip('/')}/work/{step}/{stamp}-{uuid.uuid4().hex[:8]}"


def input_uri(artifact) -> str:
    """Where an upstream step's output lives: the recorded URI, else the artifact's own path."""
    return (artifact.metadata or {}).get(URI_KEY) or artifact.path
