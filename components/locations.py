"""Where a step writes its large outputs, and where the next step finds them.

Large data (token shards, the teacher cache, checkpoints) must not be copied through every
KFP artifact. With ``storage_prefix`` set (``s3://bucket/prefix`` on a cluster, a directory
locally) a step writes to ``<prefix>/work/<step>/<key>`` and its KFP artifact only records that
URI in its metadata (``uri``); the next step reads it from there. Without a prefix the step
writes into the artifact's own path (small models, quick trials).

The key is a hash of the step's inputs (upstream URIs, the source revision, the step's
parameters and the e3prune version), as Kubeflow's own cache key is. So a step run again with
the same inputs (a retried pod, a rerun after a kill, ``kfp.local``, which caches nothing) finds
its complete output and reuses it, and a step that was interrupted finds its resumable state
(``<output>.state``, ``<output>.ckpt``) beside the same location and continues from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

URI_KEY = "uri"
log = logging.getLogger(__name__)


def input_key(step: str, inputs: Mapping[str, Any]) -> str:
    """A stable hash of what a step's output is a function of."""
    from e3prune import __version__

    text = json.dumps({"step": step, "e3prune": __version__, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def work_uri(storage_prefix: str, step: str, artifact_path: str, inputs: Mapping[str, Any]) -> str:
    """The URI a step writes its large output to: keyed by its inputs under the prefix."""
    if not storage_prefix:
        return artifact_path
    return f"{storage_prefix.rstrip('/')}/work/{step}/{input_key(step, inputs)}"


def reusable(uri: str) -> bool:
    """True when an earlier run with the same inputs left a complete output at ``uri``."""
    from e3prune import storage

    if storage.is_complete(uri):
        log.info("reusing the complete output of an earlier run with the same inputs: %s", uri)
        return True
    return False


def input_uri(artifact) -> str:
    """Where an upstream step's output lives: the recorded URI, else the artifact's own path."""
    return (artifact.metadata or {}).get(URI_KEY) or artifact.path
