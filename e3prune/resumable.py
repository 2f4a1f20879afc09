"""Resumable state of a long step (the search, the distillation): saved every few steps, found again by a rerun.

:class:`ResumableState` keeps checkpoints at a local directory or an ``s3://`` URI:

- **Local**: a checkpoint is staged in ``.step-N.partial`` and renamed to ``step-N`` (atomic),
  then older ``step-*`` directories are dropped.
- **S3**: checkpoints alternate between the prefixes ``slot-0`` and ``slot-1``, each published
  with storage's completeness marker (``_COMPLETE.json``, written last; see ``e3prune.storage``).
  The newest complete slot, by the step it records, is the checkpoint; a slot whose upload was
  cut has no marker and is ignored, and the other slot still holds the previous checkpoint.

Either way a kill at any moment leaves the previous complete checkpoint. Every checkpoint holds
``progress.json`` (its step, the run's *resume key* and what the caller adds), written last. The
resume key is the step's settings minus those that do not change the result (output, overwrite,
where the state goes, how often it is saved or logged): a rerun with other settings is refused
instead of silently continuing another run.

:func:`save_tree` / :func:`load_tree` store a nested state (dicts, lists, numbers, strings,
tensors) as JSON plus one safetensors file: loading it runs no code, unlike a pickle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from e3prune import storage
from e3prune.errors import E3PruneError

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
SLOTS = (0, 1)


def resume_key(cfg: BaseModel, ignore: Iterable[str]) -> dict[str, Any]:
    """The settings a checkpoint belongs to: ``cfg`` without the fields in ``ignore`` (JSON values)."""
    return cfg.model_dump(mode="json", exclude=set(ignore))


class ResumableState:
    """Checkpoints of one run at ``uri`` (a local directory or ``s3://bucket/prefix``).

    ``key`` is the run's resume key (:func:`resume_key`); ``field`` names the setting that chose
    ``uri``, for error messages. Saving: write the checkpoint's files into :meth:`staging_dir`,
    then :meth:`publish`. Resuming: :meth:`latest` finds the newest complete checkpoint and
    :meth:`read` returns its progress after checking the key.
    """

    def __init__(self, uri: str, key: dict[str, Any], field: str):
        self.uri = str(uri).rstrip("/")
        self.key = key
        self.field = field
        self.s3 = storage.is_s3(self.uri)
        self._slot: int | None = None  # S3: the slot holding the newest complete checkpoint

    def check_writable(self) -> None:
        """Fail now, not after hours of work, when checkpoints cannot be written."""
        if self.s3:
            storage.check_output(self.uri, overwrite=True, field=self.field)  # the bucket is reachable
        else:
            _probe_local(Path(self.uri), self.field)

    def staging_dir(self, step: int) -> Path:
        """The local directory a checkpoint is written into; the same path for every process of a node."""
        if self.s3:
            key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            return storage.cache_root() / "resumable" / key / f".step-{step:08d}.partial"
        return Path(self.uri) / f".step-{step:08d}.partial"

    def publish(self, staging: Path, step: int, progress: dict[str, Any] | None = None) -> None:
        """Write ``progress.json`` into ``staging`` (last) and make it the newest checkpoint."""
        record = {**(progress or {}), "step": step, "resume_key": self.key}
        (staging / PROGRESS_FILE).write_text(json.dumps(record, indent=1))
        if self.s3:
            self._publish_slot(staging)
        else:
            self._publish_local(staging, step)

    def latest(self) -> Path | None:
        """Local directory of the newest complete checkpoint, or None (downloaded first on S3)."""
        if not self.s3:
            steps = self._local_steps()
            return steps[-1] if steps else None
        found = [(step, slot) for slot in SLOTS if (step := self._slot_step(slot)) is not None]
        if not found:
            return None
        _, self._slot = max(found)
        return storage.input_dir(self._slot_uri(self._slot), self.field)

    def read(self, checkpoint: Path) -> dict[str, Any]:
        """The checkpoint's ``progress.json``; an error when it belongs to a run with other settings."""
        progress = json.loads((Path(checkpoint) / PROGRESS_FILE).read_text())
        saved = progress.get("resume_key")
        if saved != self.key:
            saved = saved if isinstance(saved, dict) else {}
            changed = sorted(k for k in self.key.keys() | saved.keys() if saved.get(k) != self.key.get(k))
            raise E3PruneError(
                f"{self.uri} holds the state of a run with other settings ({', '.join(changed)}); remove it or "
                f"choose another {self.field}",
                field=self.field,
            )
        return progress

    def remove(self) -> None:
        """Drop the checkpoints once the output is written. On S3 they are kept (storage deletes no
        prefix); a rerun with the same settings then resumes from the last one."""
        if self.s3:
            log.info("the resumable state in %s is kept; a rerun with the same settings resumes from it", self.uri)
            return
        root = Path(self.uri)
        for d in [*self._local_steps(), *root.glob(".step-*.partial")]:
            shutil.rmtree(d, ignore_errors=True)
        try:
            root.rmdir()
        except OSError:
            pass  # someone else's files are in there: leave them

    # -- local layout
    def _local_steps(self) -> list[Path]:
        root = Path(self.uri)
        if not root.is_dir():
            return []
        done = [d for d in root.glob("step-*") if (d / PROGRESS_FILE).is_file()]
        return sorted(done, key=lambda d: int(d.name.split("-")[1]))

    def _publish_local(self, staging: Path, step: int) -> None:
        final = Path(self.uri) / f"step-{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)  # atomic: before it the previous checkpoint is the newest
        for old in self._local_steps():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    # -- S3 layout
    def _slot_uri(self, slot: int) -> str:
        return f"{self.uri}/slot-{slot}"

    def _publish_slot(self, staging: Path) -> None:
        slot = SLOTS[0] if self._slot is None else 1 - self._slot
        storage._publish(staging, self._slot_uri(slot), self.field)  # the marker goes up last
        self._slot = slot
        shutil.rmtree(staging, ignore_errors=True)

    def _slot_step(self, slot: int) -> int | None:
        """The step of a complete slot (its marker present, progress.json verified), else None."""
        try:
            return int(json.loads(storage.read_file(self._slot_uri(slot), PROGRESS_FILE, self.field))["step"])
        except E3PruneError as exc:
            log.info("no usable checkpoint in %s: %s", self._slot_uri(slot), exc)
            return None


def _probe_local(root: Path, field: str) -> None:
    """Create ``root`` and write a probe file; leave no directory behind that was not there."""
    missing = []
    p = root
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        raise E3PruneError(
            f"cannot write checkpoints to {root}: {exc.strerror or exc}; choose a writable {field}", field=field
        ) from None
    finally:
        for d in missing:  # leave no trace of a check: the run may still fail validation
            try:
                d.rmdir()
            except OSError:
                pass


# --------------------------------------------------------------------------- pickle-free trees


def save_tree(tree: Any, directory: Path, name: str) -> None:
    """Write ``tree`` as ``name.json`` (structure, numbers, strings) and ``name.safetensors`` (tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(encoded))


def load_tree(directory: Path, name: str) -> Any:
    """The tree :func:`save_tree` wrote; reads JSON and safetensors only, so no code can run."""
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``obj``: tensors become ``{"$tensor": name}``, tuples, bytes and dicts with other than
    plain string keys are tagged so that :func:`_decode` restores them exactly."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj
        return {"$tensor": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, bytes):
        return {"$bytes": base64.b64encode(obj).decode()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a resumable state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$items" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$items"]}
    if "$tuple" in obj:
        return tuple(_decode(v, tensors) for v in obj["$tuple"])
    if "$bytes" in obj:
        return base64.b64decode(obj["$bytes"])
    return {k: _decode(v, tensors) for k, v in obj.items()}
