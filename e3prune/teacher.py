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

Each split in the manifest lists its ``shards`` (keys below the cache, or absolute URIs in a
joined cache) and, aligned with them, ``shard_details``: the sequences, size and sha256 of each
file, so a reader can find a sequence without opening shards and verify a shard it fetched.

The pass can fan out over ``shards`` tasks (the pipeline's ``teacher_shards``): task i computes
the whole cache shards ``⌊iC/N⌋ .. ⌊(i+1)C/N⌋`` of each split (C shards of ``shard_sequences``),
so its files are byte for byte those an undivided pass writes, and writes a *part* (kind
``teacher_cache_part``). :func:`join_teacher_cache` checks that the parts agree and cover every
shard once, in order, and writes one manifest that references the parts' files where they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
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
from e3prune.shard_cache import ShardCache
from e3prune.threads import follow_cpu_quota

log = logging.getLogger(__name__)
Split = Literal["search", "distill", "eval"]
BYTES_PER_TOKEN = {"values": 2, "ids": 4, "lse": 4}  # per cached id / per token, see module docstring
KIND = "teacher_cache"  # the manifest's "kind"; sampled data says "sampled_data"
PART_KIND = "teacher_cache_part"  # one task's slice of a fanned-out pass; readable only once joined
MAX_SHARDS = 256  # teacher tasks of one pass
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
    shard_sequences: Annotated[int, PipelineParameter("teacher_shard_sequences")] = Field(
        1024,
        ge=1,
        le=1_048_576,
        description="sequences per cache file: the unit a teacher task computes and a reader of an s3:// cache "
        "fetches (its local disk holds E3PRUNE_TEACHER_CACHE_SHARDS of them)",
    )
    shards: Annotated[int, PipelineParameter("teacher_shards")] = Field(
        1,
        ge=1,
        le=MAX_SHARDS,
        description="teacher tasks (pods) the pass fans out over, each computing whole cache files of every split; "
        "at most the cache files of the largest split",
    )
    shard_index: int = Field(0, ge=0, description="which of the shards tasks this one is (0-based)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="teacher weights' dtype: auto is the placement's (fp32 on the CPU, bf16 on GPUs)"
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    overwrite: bool = False

    @model_validator(mode="after")
    def _index_below_shards(self) -> TeacherLogitsConfig:
        if self.shard_index >= self.shards:
            raise ValueError(f"shard_index must be below shards ({self.shards}), got {self.shard_index}")
        return self


def cache_files(sequences: int, shard_sequences: int) -> int:
    """Cache files of a split of ``sequences`` (the last one may be short)."""
    return -(-sequences // shard_sequences)


def task_files(sequences: int, shard_sequences: int, shards: int, index: int) -> range:
    """The cache files task ``index`` of ``shards`` computes: ``⌊iC/N⌋ .. ⌊(i+1)C/N⌋`` of the C files.

    Contiguous, disjoint and covering all C files over the N tasks, at most one file apart in
    size; empty for some tasks when a split has fewer files than tasks.
    """
    c = cache_files(sequences, shard_sequences)
    return range(index * c // shards, (index + 1) * c // shards)


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
    check_shards(cfg.shards, {s: manifest["splits"][s]["sequences"] for s in cfg.splits}, cfg.shard_sequences)
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


def check_shards(
    shards: int,
    split_sequences: dict[str, int],
    shard_sequences: int,
    field: str = "shards",
    size_field: str = "shard_sequences",
) -> None:
    """More tasks than the largest split has cache files would leave a task with nothing to compute."""
    most = max(cache_files(n, shard_sequences) for n in split_sequences.values())
    if shards > most:
        sizes = ", ".join(f"{split}: {n} sequences" for split, n in split_sequences.items())
        raise E3PruneError(
            f"{shards} teacher tasks is more than the {most} cache file(s) of {shard_sequences} sequences of the "
            f"largest split the teacher reads ({sizes}); the allowed maximum is {most}: lower it, or lower "
            f"{size_field} to split the data into more files",
            field=field,
        )


def teacher_logits(cfg: TeacherLogitsConfig) -> dict:
    """The step: one teacher pass over each split (or this task's files of it); writes shards and a manifest.

    With ``shards`` > 1 the output is a part (kind ``teacher_cache_part``) to be joined with
    :func:`join_teacher_cache`. A split with fewer files than tasks leaves some tasks an empty
    slice of it (recorded as no files); :func:`check_shards` keeps every task at least one file of
    the largest split.
    """
    follow_cpu_quota()
    data_manifest = check_cache_inputs(cfg)
    totals = {split: data_manifest["splits"][split]["sequences"] for split in cfg.splits}
    files = {split: task_files(n, cfg.shard_sequences, cfg.shards, cfg.shard_index) for split, n in totals.items()}
    config = load_config(cfg.model)
    model, device = load_placed(cfg.model, cfg.device, None if cfg.dtype == "auto" else cfg.dtype)
    splits: dict[str, dict] = {}
    part: dict[str, dict] = {}
    started = time.time()
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        for split in cfg.splits:
            seqs = load_split(cfg.data, split)
            n_total, seq_len = seqs.shape
            mine = files[split]
            first = mine.start * cfg.shard_sequences
            n = max(0, min(n_total, mine.stop * cfg.shard_sequences) - first)
            shards, details = [], []
            t0 = time.time()
            bar = tqdm(total=n * seq_len, desc=f"teacher top-{cfg.top_k} [{split}]", unit="tok", unit_scale=True)
            for index in mine:
                s0 = index * cfg.shard_sequences
                chunk = seqs[s0 : s0 + cfg.shard_sequences]
                parts: dict[str, list[torch.Tensor]] = {"values": [], "ids": [], "lse": []}
                for b0 in range(0, chunk.size(0), cfg.batch_size):
                    batch = chunk[b0 : b0 + cfg.batch_size].to(device)
                    for key, t in topk_logits(model, batch, cfg.top_k).items():
                        parts[key].append(t.cpu())
                    bar.update(batch.numel())
                rel = f"{split}/shard-{index:05d}.safetensors"  # the file's index in the whole split
                (out / split).mkdir(exist_ok=True)
                tensors = {key: torch.cat(v).contiguous() for key, v in parts.items()}
                tensors["input_ids"] = chunk.to(torch.int32).contiguous()
                save_file(tensors, str(out / rel))
                shards.append(rel)
                details.append({"sequences": chunk.size(0), **storage.file_digest(out / rel)})
            bar.close()
            seconds = time.time() - t0
            splits[split] = {
                "sequences": n,
                "tokens": n * seq_len,
                "shards": shards,
                "shard_details": details,
                "seconds": round(seconds, 2),
                "tokens_per_second": round(n * seq_len / max(seconds, 1e-9), 1),
            }
            part[split] = {
                "first_file": mine.start,
                "first_sequence": first,
                "total_files": cache_files(n_total, cfg.shard_sequences),
                "total_sequences": n_total,
            }
            log.info("cached %s: %d tokens (files %d..%d) in %.1fs", split, n * seq_len, mine.start, mine.stop, seconds)
        manifest = {
            "kind": KIND if cfg.shards == 1 else PART_KIND,
            "format_version": FORMAT_VERSION,
            "teacher": {
                "model": cfg.model,
                "model_type": config.model_type,
                "num_hidden_layers": config.num_hidden_layers,
                "max_position_embeddings": getattr(config, "max_position_embeddings", None),
                "fingerprint": teacher_fingerprint(cfg.model, config),
            },
            "top_k": cfg.top_k,
            "seq_len": data_manifest["seq_len"],
            "vocab_size": config.vocab_size,
            "tokenizer": data_manifest["tokenizer"],
            "data": {"uri": cfg.data, "seed": data_manifest.get("seed")},
            "bytes_per_token": {
                "logits": cfg.top_k * (BYTES_PER_TOKEN["values"] + BYTES_PER_TOKEN["ids"]) + BYTES_PER_TOKEN["lse"],
                "input_ids": 4,
            },
            "shard_sequences": cfg.shard_sequences,
            "part": {"index": cfg.shard_index, "count": cfg.shards, "splits": part},
            "splits": splits,
            "seconds": round(time.time() - started, 2),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# What the parts of one pass must agree on (the teacher, its settings and the data it read).
AGREE_KEYS = ("format_version", "top_k", "seq_len", "vocab_size", "tokenizer", "data", "shard_sequences")


def join_teacher_cache(parts: list[str], output: str, overwrite: bool = False, copy_files: bool = False) -> dict:
    """One cache from the parts of a fanned-out teacher pass; returns its manifest.

    ``parts`` are the outputs of tasks 0 .. N-1 (local directories or ``s3://`` URIs), in order.
    They must come from one pass: the same teacher (fingerprint), K, seq_len, vocabulary,
    tokenizer, data and file size, N parts of N, and together every cache file of every split
    once, in order. The joined manifest lists each split's files as absolute URIs (or absolute
    paths) where the parts wrote them, with their sequences, sizes and sha256: no shard data is
    copied, and the parts must be kept as long as the joined cache is read. ``copy_files`` copies
    the parts' files below ``output`` instead (keys relative to it): for parts that are not
    reachable from where the cache is read, such as KFP artifacts without a storage prefix.
    """
    if not parts:
        raise E3PruneError("no parts to join; give the outputs of the teacher tasks", field="parts")
    manifests = [_read_cache_manifest(uri, kinds=(KIND, PART_KIND), field="parts") for uri in parts]
    _check_parts(parts, manifests)
    local_parts = [uri for uri in parts if not storage.is_s3(uri)]
    if local_parts and storage.is_s3(output) and not copy_files:
        raise E3PruneError(
            f"{local_parts[0]} is a local directory but the joined cache goes to {output}: its readers would not "
            "find the local files; write the parts to S3 too, or join with copy_files",
            field="parts",
        )
    first = manifests[0]
    # An S3 part's marker lists each file's size and sha256 as uploaded: read once a part.
    markers = [storage.read_marker(uri, field="parts") if storage.is_s3(uri) else None for uri in parts]
    splits: dict[str, dict] = {}
    sources: dict[str, tuple[str, dict]] = {}  # key in the joined cache -> (the part's file, its size and sha256)
    for split in first["splits"]:
        refs, details, seconds = [], [], 0.0
        for uri, m, marker in zip(parts, manifests, markers, strict=True):
            entry = m["splits"][split]
            for rel, detail in zip(entry["shards"], entry["shard_details"], strict=True):
                located = _part_file(uri, rel, detail, marker)
                key = rel if copy_files else located
                sources[key] = (located, detail)
                refs.append(key)
                details.append(detail)
            seconds = max(seconds, entry.get("seconds", 0.0))  # the tasks run side by side
        n = sum(d["sequences"] for d in details)
        splits[split] = {
            "sequences": n,
            "tokens": n * first["seq_len"],
            "shards": refs,
            "shard_details": details,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(n * first["seq_len"] / max(seconds, 1e-9), 1),
        }
    manifest = {k: v for k, v in first.items() if k not in ("part", "splits", "seconds")}
    manifest |= {
        "kind": KIND,
        "joined": {"parts": list(parts), "copied": copy_files},
        "splits": splits,
        "seconds": round(max(m.get("seconds", 0.0) for m in manifests), 2),
    }
    with storage.output_dir(output, overwrite, field="output") as out:
        if copy_files:
            for key, (located, detail) in sources.items():
                (out / key).parent.mkdir(parents=True, exist_ok=True)
                if storage.is_s3(located):
                    storage.download_verified(located, out / key, detail, field="parts")
                else:
                    shutil.copyfile(located, out / key)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info(
        "joined %d parts into %s (%s)",
        len(parts),
        output,
        ", ".join(f"{s}: {v['sequences']} sequences" for s, v in splits.items()),
    )
    return manifest


def _check_parts(parts: list[str], manifests: list[dict]) -> None:
    """The parts are one pass's N tasks, in order, covering every file of every split once."""
    first, count = manifests[0], len(manifests)
    for uri, m in zip(parts, manifests, strict=True):
        if "joined" in m:
            raise E3PruneError(f"{uri} is a joined cache already; give the parts it was joined from", field="parts")
        if "part" not in m or any("shard_details" not in e for e in m["splits"].values()):
            raise E3PruneError(
                f"{uri} is a teacher cache written before passes could fan out; build it again with "
                "`e3prune teacher-logits`",
                field="parts",
            )
        for key in AGREE_KEYS:
            if m.get(key) != first.get(key):
                raise E3PruneError(
                    f"{uri} does not belong with {parts[0]}: their {key} differ ({m.get(key)!r} vs {first.get(key)!r}); "
                    "join the parts of one teacher pass",
                    field="parts",
                )
        if m["teacher"].get("fingerprint") != first["teacher"].get("fingerprint"):
            raise E3PruneError(
                f"{uri} was made by another teacher than {parts[0]} ({m['teacher'].get('model')} vs "
                f"{first['teacher'].get('model')}); join the parts of one teacher pass",
                field="parts",
            )
        if sorted(m["splits"]) != sorted(first["splits"]):
            raise E3PruneError(
                f"{uri} has the splits {sorted(m['splits'])}, {parts[0]} has {sorted(first['splits'])}", field="parts"
            )
        if m["part"]["count"] != count:
            raise E3PruneError(
                f"{uri} is part {m['part']['index']} of {m['part']['count']}, but {count} parts were given; "
                f"give all {m['part']['count']} parts of the pass, in order",
                field="parts",
            )
    indices = [m["part"]["index"] for m in manifests]
    if indices != list(range(count)):
        raise E3PruneError(
            f"the parts are tasks {indices}; give each of tasks 0..{count - 1} once, in order", field="parts"
        )
    for split in first["splits"]:
        expected = 0
        for uri, m in zip(parts, manifests, strict=True):
            where = m["part"]["splits"][split]
            if where["total_sequences"] != first["part"]["splits"][split]["total_sequences"]:
                raise E3PruneError(f"{uri} read another {split!r} split than {parts[0]}", field="parts")
            if where["first_file"] != expected:
                raise E3PruneError(
                    f"{uri} starts the {split!r} split at file {where['first_file']}, not {expected}: the parts "
                    "overlap or leave files out",
                    field="parts",
                )
            expected += len(m["splits"][split]["shards"])
        total = first["part"]["splits"][split]["total_files"]
        if expected != total:
            raise E3PruneError(f"the parts hold {expected} of the {total} files of the {split!r} split", field="parts")


def _part_file(part: str, rel: str, detail: dict, marker: dict | None) -> str:
    """The absolute location of a part's file, checked to be there as its writer recorded it."""
    storage.check_relative_key(rel, part, "parts")
    if marker is not None:  # an S3 part: its completeness marker lists the file's size and sha256
        got = marker.get(rel)
        if got is None or got["size"] != detail["size"] or got["sha256"] != detail["sha256"]:
            raise E3PruneError(f"{part}/{rel} is not the file its manifest records (see its marker)", field="parts")
        return f"{part.rstrip('/')}/{rel}"
    path = Path(part).expanduser().resolve() / rel
    if not path.is_file() or path.stat().st_size != detail["size"]:
        raise E3PruneError(f"{path} is missing or not the size its manifest records", field="parts")
    return str(path)


class TeacherTopK:
    """Read side of the cache: shards sliced per batch (nothing loaded whole).

    A local cache is read in place (memory-mapped). An ``s3://`` cache is streamed: its manifest
    says where every file is, how many sequences it holds and its sha256, so a batch fetches only
    the files it needs into a :class:`~e3prune.shard_cache.ShardCache` of at most
    ``max_local_shards`` files (``$E3PRUNE_TEACHER_CACHE_SHARDS``, default 4), each verified
    before use. A joined cache (:func:`join_teacher_cache`) reads the same way, wherever its
    parts' files are. A cache written before the manifest recorded its files is downloaded whole.
    """

    def __init__(self, uri: str, max_local_shards: int | None = None):
        self.uri = uri
        self.manifest = _read_cache_manifest(uri)
        self.top_k: int = self.manifest["top_k"]
        self.seq_len: int = self.manifest["seq_len"]
        streamable = all("shard_details" in e for e in self.manifest["splits"].values())
        # Keys of a cache on S3 resolve below its prefix; of a local one (or an old, downloaded one) below root.
        self.root: Path | None = (
            None if storage.is_s3(uri) and streamable else storage.input_dir(uri, field="teacher_cache")
        )
        refs = [r for e in self.manifest["splits"].values() for r in e["shards"]]
        self._remote = streamable and any(self._is_remote(r) for r in refs)
        self._local_shards: ShardCache | None = None
        if self._remote:
            self._local_shards = ShardCache(max_local_shards, field="teacher_cache")
            sizes = [d["size"] for e in self.manifest["splits"].values() for d in e["shard_details"]]
            self._local_shards.check_disk(max(sizes, default=0))
        if streamable:
            self._check_local_files()

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

    def _is_remote(self, ref: str) -> bool:
        return storage.is_s3(ref) or (self.root is None and not Path(ref).is_absolute())

    def _location(self, ref: str) -> str:
        """Where a manifest's file is: an absolute URI or path as given, a key below the cache otherwise."""
        if storage.is_s3(ref) or Path(ref).is_absolute():
            return ref
        storage.check_relative_key(ref, self.uri, "teacher_cache")
        return f"{self.uri.rstrip('/')}/{ref}" if self.root is None else str(self.root / ref)

    def _check_local_files(self) -> None:
        """Every local file the manifest lists is there with its recorded size (a joined cache's parts were kept)."""
        for entry in self.manifest["splits"].values():
            for ref, detail in zip(entry["shards"], entry["shard_details"], strict=True):
                if self._is_remote(ref):
                    continue
                path = Path(self._location(ref))
                if not path.is_file() or path.stat().st_size != detail["size"]:
                    raise E3PruneError(
                        f"the cache {self.uri} lists {path}, which is missing or not the size its writer recorded "
                        f"({detail['size']} bytes): a joined cache reads its parts where they were written, so keep "
                        "them, or build the cache again",
                        field="teacher_cache",
                    )

    def _open(self, ref: str, detail: dict | None) -> Path:
        """A local path of the file ``ref``: in place, or fetched and verified into the bounded local cache."""
        if self._local_shards is not None and self._is_remote(ref):
            return self._local_shards.path(self._location(ref), detail)
        return Path(self._location(ref))

    def local_files(self) -> list[Path]:
        """The fetched shard files on local disk now (none for a local cache)."""
        return [] if self._local_shards is None else self._local_shards.files()

    def close(self) -> None:
        """Delete fetched shard files (also done when the reader is collected)."""
        if self._local_shards is not None:
            self._local_shards.close()

    def batch(self, split: str, start: int, count: int) -> dict[str, torch.Tensor]:
        """Sequences ``start .. start + count`` of ``split`` (crossing shard boundaries as needed)."""
        entry = self._split(split)
        details = entry.get("shard_details") or [None] * len(entry["shards"])
        out: dict[str, list[torch.Tensor]] = {"input_ids": [], "values": [], "ids": [], "lse": []}
        offset, want_end = 0, start + count
        for ref, detail in zip(entry["shards"], details, strict=True):
            if detail is not None and offset + detail["sequences"] <= start:
                offset += detail["sequences"]  # before the batch: known from the manifest, never fetched
                continue
            with safe_open(str(self._open(ref, detail)), framework="pt") as f:
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


def _read_cache_manifest(uri: str, kinds: tuple[str, ...] = (KIND,), field: str = "teacher_cache") -> dict:
    """The manifest of a teacher cache (of one of ``kinds``); anything else (sampled data, another step's output,
    a part of a fanned-out pass that was not joined) is refused. On S3 only the manifest is read."""
    manifest = storage.read_manifest_only(uri, "manifest.json", field, PRODUCER)
    kind = manifest.get("kind", KIND if "top_k" in manifest else None)  # caches before "kind" have top_k
    if kind == "sampled_data" or (kind is None and "sources" in manifest and "tokenizer" in manifest):
        raise E3PruneError(
            f"{uri} is sampled data (the output of `e3prune sample`), not a teacher cache; {PRODUCER}: "
            f"run `e3prune teacher-logits --data {uri} --output CACHE` and give CACHE",
            field=field,
        )
    if kind == PART_KIND and kind not in kinds:
        part = manifest.get("part", {})
        raise E3PruneError(
            f"{uri} is part {part.get('index')} of {part.get('count')} of a teacher pass that fanned out, not a "
            "whole cache: join the parts with `e3prune join-teacher-cache` (the pipeline's join-teacher-cache step) "
            "and give the joined cache",
            field=field,
        )
    if kind not in kinds:
        what = f"an output of kind {kind!r}" if kind else "not a teacher cache (its manifest has no kind and no top_k)"
        raise E3PruneError(f"{uri} is {what}; {PRODUCER}", field=field)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise E3PruneError(
            f"{uri} is a teacher cache of format {manifest.get('format_version')!r}; this e3prune reads "
            f"{FORMAT_VERSION}: build it again with `e3prune teacher-logits`",
            field=field,
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise E3PruneError(
            f"{uri}/manifest.json lacks {', '.join(missing)}; build the cache again with `e3prune teacher-logits`",
            field=field,
        )
    return manifest
