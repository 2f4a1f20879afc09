"""The teacher top-K logits cache (docs/method.md, Stage 1).

One teacher pass over the chosen splits stores, per token, the top-K logit values (bf16), their
vocabulary ids (int32) and the log-sum-exp of the full logits (fp32): 2K + 4K + 4 = 64 bytes a
token at K = 10. The token ids themselves (int32, 4 bytes) are stored beside them so that the
cache is self-contained and can never be misaligned with its data. Later stages read it as a
stream (:class:`TeacherTopK`) and never load the teacher.

Layout under the output URI::

    manifest.json                     kind "teacher_cache", the teacher's fingerprint, K, seq_len, splits
    {split}/shard-00000.safetensors   input_ids (n, S) int32, values (n, S, K) bf16,
                                      ids (n, S, K) int32, lse (n, S) fp32
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from e3prune import storage
from e3prune.config import PipelineParameter, StepConfig
from e3prune.data import load_split, read_manifest, tokenizer_fingerprint
from e3prune.errors import E3PruneError
from e3prune.model_io import load_config, load_tokenizer, model_dir
from e3prune.placement import DEVICE_HELP, Device, check_device, load_placed
from e3prune.reference import default_model
from e3prune.threads import follow_cpu_quota

log = logging.getLogger(__name__)
Split = Literal["search", "distill", "eval"]
BYTES_PER_TOKEN = {"values": 2, "ids": 4, "lse": 4}  # per cached id / per token, see module docstring
KIND = "teacher_cache"  # the manifest's "kind"; sampled data says "sampled_data"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("top_k", "seq_len", "vocab_size", "tokenizer", "splits")
PRODUCER = "give the output of `e3prune teacher-logits` (the teacher's top-K cache of sampled data)"


class TeacherLogitsConfig(StepConfig):
    """What ``e3prune teacher-logits`` takes."""

    model: str = Field(default_factory=default_model, description="teacher checkpoint directory")
    data: str = Field(description="output of the sample step (local directory or s3:// URI)")
    output: str = Field(description="where to write the cache (local directory or s3:// URI)")
    top_k: Annotated[int, PipelineParameter()] = Field(
        10, ge=1, description="teacher logits cached per token (K; the paper's K = 10)"
    )
    splits: list[Split] = Field(default_factory=lambda: ["search", "distill"], min_length=1)
    batch_size: Annotated[int, PipelineParameter("teacher_batch_size")] = Field(
        8, ge=1, le=4096, description="sequences per teacher forward"
    )
    shard_sequences: int = Field(1024, ge=1, description="sequences per cache shard")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="teacher weights' dtype: auto is the placement's (fp32 on the CPU, bf16 on GPUs)"
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    overwrite: bool = False


def check_cache_inputs(cfg: TeacherLogitsConfig) -> dict:
    """Everything that can be checked without loading weights; returns the data manifest."""
    check_device(cfg.device)
    config = load_config(cfg.model)
    if cfg.top_k > config.vocab_size:
        raise E3PruneError(f"K = {cfg.top_k} is larger than the vocabulary ({config.vocab_size})", field="top_k")
    manifest = read_manifest(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise E3PruneError(
            f"the data was tokenized with another tokenizer ({manifest['tokenizer']['path']}) than the teacher's "
            f"({cfg.model}); sample the data with the teacher's tokenizer",
            field="data",
        )
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and manifest["seq_len"] > max_pos:
        raise E3PruneError(f"sequences of {manifest['seq_len']} exceed the teacher's {max_pos} positions", field="data")
    for split in cfg.splits:
        if manifest["splits"].get(split, {}).get("sequences", 0) == 0:
            raise E3PruneError(f"the data has no {split!r} split (or it is empty); sample it first", field="splits")
    storage.check_output(cfg.output, cfg.overwrite)
    return manifest


def teacher_fingerprint(model: str, config) -> dict:
    """What a cache records to recognise its teacher (docs/method.md, Stage 1): the sha256 of its
    config.json normalised as JSON (sorted keys, without ``transformers_version``, which only says
    what wrote the file) and the hub revision the checkpoint was loaded at, when known."""
    raw = json.loads((model_dir(model) / "config.json").read_text())
    raw.pop("transformers_version", None)
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    return {
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "revision": getattr(config, "_commit_hash", None),
    }


@torch.no_grad()
def topk_logits(model, input_ids: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """One teacher forward: top-K values (bf16), ids (int32) and log-sum-exp (fp32) per token."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()  # (B, S, V)
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = torch.topk(logits, k, dim=-1, sorted=True)
    return {"values": values.to(torch.bfloat16), "ids": ids.to(torch.int32), "lse": lse}


def teacher_logits(cfg: TeacherLogitsConfig) -> dict:
    """The step: one teacher pass over each split; writes shards and a manifest; returns the manifest."""
    follow_cpu_quota()
    data_manifest = check_cache_inputs(cfg)
    model, device = load_placed(cfg.model, cfg.device, None if cfg.dtype == "auto" else cfg.dtype)
    splits: dict[str, dict] = {}
    started = time.time()
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        for split in cfg.splits:
            seqs = load_split(cfg.data, split)
            n, seq_len = seqs.shape
            shards = []
            t0 = time.time()
            bar = tqdm(total=n * seq_len, desc=f"teacher top-{cfg.top_k} [{split}]", unit="tok", unit_scale=True)
            for s0 in range(0, n, cfg.shard_sequences):
                chunk = seqs[s0 : s0 + cfg.shard_sequences]
                parts: dict[str, list[torch.Tensor]] = {"values": [], "ids": [], "lse": []}
                for b0 in range(0, chunk.size(0), cfg.batch_size):
                    batch = chunk[b0 : b0 + cfg.batch_size].to(device)
                    for key, t in topk_logits(model, batch, cfg.top_k).items():
                        parts[key].append(t.cpu())
                    bar.update(batch.numel())
                rel = f"{split}/shard-{len(shards):05d}.safetensors"
                (out / split).mkdir(exist_ok=True)
                tensors = {key: torch.cat(v).contiguous() for key, v in parts.items()}
                tensors["input_ids"] = chunk.to(torch.int32).contiguous()
                save_file(tensors, str(out / rel))
                shards.append(rel)
            bar.close()
            seconds = time.time() - t0
            splits[split] = {
                "sequences": n,
                "tokens": n * seq_len,
                "shards": shards,
                "seconds": round(seconds, 2),
                "tokens_per_second": round(n * seq_len / max(seconds, 1e-9), 1),
            }
            log.info("cached %s: %d tokens in %.1fs", split, n * seq_len, seconds)
        manifest = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "teacher": {
                "model": cfg.model,
                "model_type": model.config.model_type,
                "num_hidden_layers": model.config.num_hidden_layers,
                "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
                "fingerprint": teacher_fingerprint(cfg.model, model.config),
            },
            "top_k": cfg.top_k,
            "seq_len": data_manifest["seq_len"],
            "vocab_size": model.config.vocab_size,
            "tokenizer": data_manifest["tokenizer"],
            "data": {"uri": cfg.data, "seed": data_manifest.get("seed")},
            "bytes_per_token": {
                "logits": cfg.top_k * (BYTES_PER_TOKEN["values"] + BYTES_PER_TOKEN["ids"]) + BYTES_PER_TOKEN["lse"],
                "input_ids": 4,
            },
            "splits": splits,
            "seconds": round(time.time() - started, 2),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class TeacherTopK:
    """Read side of the cache: memory-mapped shards, sliced per batch (nothing loaded whole)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.root = storage.input_dir(uri, field="teacher_cache")
        self.manifest = _read_cache_manifest(uri, self.root / "manifest.json")
        self.top_k: int = self.manifest["top_k"]
        self.seq_len: int = self.manifest["seq_len"]

    def teacher(self) -> str:
        """The teacher the cache was made with, as a message names it."""
        t = self.manifest.get("teacher") or {}
        layers, model_type = t.get("num_hidden_layers", "?"), t.get("model_type", "?")
        return f"{t.get('model', 'an unrecorded model')} ({layers} layers, {model_type})"

    def check_positions(self, config, who: str = "model") -> None:
        """The cache's sequences fit the positions of the model that reads them."""
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and self.seq_len > max_pos:
            raise E3PruneError(
                f"sequence layout does not match: the cache's sequences have {self.seq_len} tokens, the {who} has "
                f"{max_pos} positions; the cache {self.uri} belongs to teacher {self.teacher()}; give a cache of "
                f"data sampled with seq_len at most {max_pos}",
                field="teacher_cache",
            )

    def check_teacher(self, model: str, config) -> None:
        """``model`` is the teacher the cache was made with (search and select score that very model).

        Checked on the recorded fingerprint; a cache written before fingerprints were recorded is
        checked on the model type and layer count it recorded.
        """
        recorded = self.manifest.get("teacher") or {}
        fp = recorded.get("fingerprint")
        if fp is not None:
            mine = teacher_fingerprint(model, config)
            revisions = (fp.get("revision"), mine["revision"])
            same = fp.get("config_sha256") == mine["config_sha256"] and (None in revisions or len(set(revisions)) == 1)
        else:
            mine = {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers}
            same = all(recorded.get(k, v) == v for k, v in mine.items())
        if not same:
            raise E3PruneError(
                f"{model} ({config.num_hidden_layers} layers, {config.model_type}) is not the teacher the cache "
                f"{self.uri} was made with: it belongs to {self.teacher()}. Give that teacher as model, or build a "
                f"cache of this model with `e3prune teacher-logits --model {model}`",
                field="model",
            )

    def sequences(self, split: str) -> int:
        return self._split(split)["sequences"]

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise E3PruneError(
                f"the teacher cache has no {split!r} split; it has {sorted(self.manifest['splits'])}", field="split"
            )
        return self.manifest["splits"][split]

    def _shard_files(self, split: str) -> list[Path]:
        return [self.root / rel for rel in self._split(split)["shards"]]

    def batch(self, split: str, start: int, count: int) -> dict[str, torch.Tensor]:
        """Sequences ``start .. start + count`` of ``split`` (crossing shard boundaries as needed)."""
        out: dict[str, list[torch.Tensor]] = {"input_ids": [], "values": [], "ids": [], "lse": []}
        offset, want_end = 0, start + count
        for path in self._shard_files(split):
            with safe_open(str(path), framework="pt") as f:
                n = f.get_slice("input_ids").get_shape()[0]
                lo, hi = max(start, offset), min(want_end, offset + n)
                if lo < hi:
                    for key in out:
                        out[key].append(f.get_slice(key)[lo - offset : hi - offset])
            offset += n
            if offset >= want_end:
                break
        if not out["input_ids"]:
            raise E3PruneError(
                f"sequences {start}..{want_end} are beyond the {split!r} split ({offset})", field="split"
            )
        batch = {k: torch.cat(v) for k, v in out.items()}
        batch["input_ids"] = batch["input_ids"].long()
        return batch

    def iter_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches of ``split`` from sequence ``start`` to the end."""
        n = self.sequences(split)
        for s in range(start, n, batch_size):
            yield self.batch(split, s, min(batch_size, n - s))

    def load(self, split: str) -> dict[str, torch.Tensor]:
        """A whole split in memory (for the search split, which is small)."""
        return self.batch(split, 0, self.sequences(split))


def _read_cache_manifest(uri: str, path: Path) -> dict:
    """The manifest of a teacher cache; anything else (sampled data, another step's output) is refused."""
    manifest = storage.read_json_manifest(uri, path, "teacher_cache", PRODUCER)
    kind = manifest.get("kind", KIND if "top_k" in manifest else None)  # caches before "kind" have top_k
    if kind == "sampled_data" or (kind is None and "sources" in manifest and "tokenizer" in manifest):
        raise E3PruneError(
            f"{uri} is sampled data (the output of `e3prune sample`), not a teacher cache; {PRODUCER}: "
            f"run `e3prune teacher-logits --data {uri} --output CACHE` and give CACHE",
            field="teacher_cache",
        )
    if kind != KIND:
        what = f"an output of kind {kind!r}" if kind else "not a teacher cache (its manifest has no kind and no top_k)"
        raise E3PruneError(f"{uri} is {what}; {PRODUCER}", field="teacher_cache")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise E3PruneError(
            f"{uri} is a teacher cache of format {manifest.get('format_version')!r}; this e3prune reads "
            f"{FORMAT_VERSION}: build it again with `e3prune teacher-logits`",
            field="teacher_cache",
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise E3PruneError(
            f"{uri}/manifest.json lacks {', '.join(missing)}; build the cache again with `e3prune teacher-logits`",
            field="teacher_cache",
        )
    return manifest
