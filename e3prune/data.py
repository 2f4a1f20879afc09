"""Stage 0 — data sampling (docs/method.md): token budgets from a weighted mixture of sources.

Three splits, disjoint by whole documents and deterministic for a seed:

- ``eval``    held-out perplexity and teacher agreement (Stage 6);
- ``search``  the mask search and its final selection (Stages 1-3);
- ``distill`` recovery distillation (Stages 1 and 5).

Per source, the documents are shuffled with the seed and handed out in the order eval, search,
distill: each split takes whole documents until it holds its share of the budget. Filling
``eval`` first keeps it identical when the other budgets change, so numbers measured on it stay
comparable across runs. A split's budget is shared across sources by their normalised weights.

Each document is tokenized without special tokens and followed by EOS; a split's documents (of
all sources, shuffled together) are concatenated and cut into sequences of ``seq_len``. A
split holds ⌈budget / seq_len⌉ sequences: the budget, rounded up to whole sequences.

Sources are tokenized lazily, only as far as the budgets need, so a large hub dataset costs
the tokens that are sampled, not its whole size. What a source may be, and how its rows become
documents, is :mod:`e3prune.data_sources`; this module samples, packs, writes and reads the splits.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from e3prune import __version__, reference, storage
from e3prune.config import PipelineParameter, StepConfig
from e3prune.data_sources import (
    BUILTIN_REFERENCE,
    BUILTIN_REFERENCE_TRAIN,
    Source,
    SourceSpec,
    documents,
    open_source,
    open_tokenizer,
    tokenizer_fingerprint,
)
from e3prune.errors import E3PruneError
from e3prune.threads import follow_cpu_quota

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "sampled_data"  # the manifest's "kind"; a teacher cache says "teacher_cache"
MANIFEST = "manifest.json"
# While sampling, the documents read and the packed splits (all three, until they are written) are
# both held as int32: about 8 bytes a token of the budgets. The shards take 4 bytes a token on disk.
MEMORY_BYTES_PER_TOKEN = 8
DISK_BYTES_PER_TOKEN = 4
SPLITS = ("search", "distill", "eval")  # the order of the manifest
FILL_ORDER = ("eval", "search", "distill")  # eval first: it must not move when other budgets change
# Held-out text for eval; the reference model's training files (about 3 M tokens) for search and
# distillation, which then never repeat a sequence at the default budgets (docs/method.md, Stage 0).
DEFAULT_SOURCES = (
    {"uri": BUILTIN_REFERENCE, "splits": ["eval"]},
    {"uri": BUILTIN_REFERENCE_TRAIN, "splits": ["search", "distill"]},
)


def _default_tokenizer() -> str:
    return str(reference.MODEL_DIR)


class SampleConfig(StepConfig):
    """Stage 0: what to sample, how much of it, and where to write it."""

    sources: list[SourceSpec] = Field(
        default_factory=lambda: [SourceSpec.model_validate(s) for s in DEFAULT_SOURCES],
        min_length=1,
        description="the mixture; default: eval from the reference model's held-out corpus, search and distill "
        "from its training files (enough for the default budgets without repeating a sequence)",
    )
    tokenizer: str = Field(default_factory=_default_tokenizer, description="model directory whose tokenizer to use")
    seq_len: Annotated[int, PipelineParameter()] = Field(
        256, ge=2, description="tokens per packed sequence; at most the model's positions"
    )
    search_tokens: Annotated[int, PipelineParameter("search_split_tokens")] = Field(
        647_168,
        ge=0,
        description="tokens sampled for the search split (0: empty split); the default holds the default search "
        "budget (614,400) once plus the 128 held-back sequences of 256 tokens that judge its final candidates",
    )
    distill_tokens: Annotated[int, PipelineParameter("distill_split_tokens")] = Field(
        524_288,
        ge=0,
        description="tokens sampled for the distill split (0: empty split); the default holds the "
        "default distill budget once",
    )
    eval_tokens: Annotated[int, PipelineParameter("eval_split_tokens")] = Field(
        65536,
        ge=0,
        description="tokens sampled for the eval split, for evaluation only, never for choices (0: empty split)",
    )
    seed: Annotated[int, PipelineParameter("sample_seed")] = Field(0, ge=0, description="seed of the data sampler")
    allow_repeat: Annotated[bool, PipelineParameter()] = Field(
        False, description="let the sampler cycle a split's own documents when the sources are smaller than the budgets"
    )
    shard_sequences: int = Field(1024, ge=1, description="sequences per safetensors shard")
    output: str = Field(min_length=1, description="local directory or s3://bucket/prefix")
    overwrite: bool = False

    @field_validator("sources")
    @classmethod
    def _distinct_names(cls, sources: list[SourceSpec]) -> list[SourceSpec]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources need distinct names, {dupes} appear more than once; set name on each")
        return sources

    @model_validator(mode="after")
    def _every_split_fed(self) -> SampleConfig:
        unfed = [s for s in SPLITS if self.budget_tokens(s) and not any(s in src.splits for src in self.sources)]
        if unfed:
            raise ValueError(
                f"no source feeds the {' and '.join(unfed)} split; add it to a source's splits or set its budget to 0"
            )
        return self

    def budget_tokens(self, split: str) -> int:
        return {"search": self.search_tokens, "distill": self.distill_tokens, "eval": self.eval_tokens}[split]


# --------------------------------------------------------------------------- sampling


def _split_tokens(cfg: SampleConfig) -> dict[str, int]:
    """Tokens per split: the budget rounded up to whole sequences."""
    return {s: math.ceil(cfg.budget_tokens(s) / cfg.seq_len) * cfg.seq_len for s in SPLITS}


def _source_needs(cfg: SampleConfig, split_tokens: dict[str, int]) -> list[dict[str, int]]:
    """Tokens each source owes each split: its weight, normalised over the sources that feed the
    split (``splits``), of the split's tokens, rounded up; nothing for a split it does not feed.

    Rounding up per source makes the sum reach the split's total, so packing never runs short;
    exact fractions keep float rounding from undercutting that by a token.
    """
    weight = {s: sum(Fraction(src.weight) for src in cfg.sources if s in src.splits) for s in SPLITS}
    return [
        {s: math.ceil(split_tokens[s] * Fraction(src.weight) / weight[s]) if s in src.splits else 0 for s in SPLITS}
        for src in cfg.sources
    ]


def _take(source: Source, needs: dict[str, int], tokenizer: Any, cfg: SampleConfig) -> None:
    """Hand the source's shuffled documents to eval, then search, then distill (docs/method.md, Stage 0)."""
    from tqdm.auto import tqdm

    docs = documents(source, tokenizer, cfg.seed)
    source.taken = {s: [] for s in FILL_ORDER}
    got = dict.fromkeys(FILL_ORDER, 0)
    with tqdm(
        total=sum(needs.values()), unit="tok", unit_scale=True, desc=f"tokenize {source.spec.name}", disable=None
    ) as bar:
        for split in FILL_ORDER:
            while got[split] < needs[split]:
                doc = next(docs, None)
                if doc is None:
                    source.exhausted = True
                    break
                bar.update(min(len(doc.ids), needs[split] - got[split]))
                source.taken[split].append(doc)
                got[split] += len(doc.ids)
                source.tokens_read += len(doc.ids)
                source.documents_read += 1
            if source.exhausted:
                break
    log.info(
        "source %r: %d documents, %d tokens read%s",
        source.spec.name,
        source.documents_read,
        source.tokens_read,
        " (all of it)" if source.exhausted else "",
    )
    source.repeated = dict.fromkeys(FILL_ORDER, False)
    if not source.exhausted:
        return
    short = [s for s in FILL_ORDER if got[s] < needs[s]]
    if not cfg.allow_repeat:
        split = short[0]
        before = [s for s in FILL_ORDER[: FILL_ORDER.index(split)] if needs[s]]
        raise E3PruneError(
            f"source {source.spec.name!r} has {source.tokens_read} tokens in {source.documents_read} documents; "
            f"the splits need {sum(needs.values())} from it ({', '.join(f'{s} {needs[s]}' for s in FILL_ORDER)}), "
            f"and after {' and '.join(before) or 'no other split'} only {got[split]} tokens are available for "
            f"{split}. Lower {split}_tokens, add data, or set allow_repeat to cycle each split's own documents",
            field=f"{split}_tokens",
        )
    _reallocate_and_cycle(source, needs)


def _reallocate_and_cycle(source: Source, needs: dict[str, int]) -> None:
    """A source too small for its budgets (``allow_repeat``): share it, then repeat within splits.

    Its documents are divided over the splits in proportion to what each needs (still eval,
    search, distill, each at least one document), then each split cycles through *its own*
    documents up to its need. Documents are never lent from one split to another, so the splits
    stay disjoint.
    """
    docs = [d for s in FILL_ORDER for d in source.taken[s]]
    active = [s for s in FILL_ORDER if needs[s] > 0]
    if len(docs) < len(active):
        raise E3PruneError(
            f"source {source.spec.name!r} has {len(docs)} documents, too few to give each of "
            f"{', '.join(active)} a document of its own even with allow_repeat; add data",
            field=f"{active[len(docs)]}_tokens",
        )
    total, need_total = sum(len(d.ids) for d in docs), sum(needs.values())
    source.taken = {s: [] for s in FILL_ORDER}
    pos = 0
    for k, split in enumerate(active):
        share = total * needs[split] / need_total
        reserve = len(active) - k - 1  # documents left for the splits after this one
        got = 0
        while pos < len(docs) - reserve and (got < share or not source.taken[split] or k == len(active) - 1):
            source.taken[split].append(docs[pos])
            got += len(docs[pos].ids)
            pos += 1
    for split in active:
        own = source.taken[split]
        have = sum(len(d.ids) for d in own)
        if have >= needs[split]:
            continue
        cycled, got, i = list(own), have, 0
        while got < needs[split]:
            cycled.append(own[i % len(own)])
            got += len(own[i % len(own)].ids)
            i += 1
        source.taken[split] = cycled
        source.repeated[split] = True
    log.warning(
        "source %r is smaller than its budgets: splits %s repeat their own documents",
        source.spec.name,
        [s for s in active if source.repeated[s]],
    )


@dataclass
class PackedSplit:
    input_ids: np.ndarray  # int32 (sequences, seq_len)
    tokens_by_source: dict[str, int]
    documents: int
    repeated: bool


def _pack(split: str, sources: list[Source], n_tokens: int, cfg: SampleConfig) -> PackedSplit:
    """Shuffle the split's documents of all sources together, concatenate, cut into sequences."""
    docs = [d for src in sources for d in src.taken.get(split, [])]
    order = np.random.default_rng([cfg.seed, 1, SPLITS.index(split)]).permutation(len(docs))
    parts, kept = [], 0
    by_source = {src.spec.name: 0 for src in sources}
    used: set[tuple[int, int]] = set()
    for i in order:
        if kept >= n_tokens:
            break
        doc = docs[i]
        take = min(len(doc.ids), n_tokens - kept)
        parts.append(doc.ids[:take])  # only the last document is cut: the final partial sequence is dropped
        kept += take
        by_source[sources[doc.source].spec.name] += take
        used.add((doc.source, doc.row))
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
    assert stream.size == n_tokens, f"packing {split}: {stream.size} tokens for a need of {n_tokens}"
    return PackedSplit(
        input_ids=stream.reshape(-1, cfg.seq_len),
        tokens_by_source=by_source,
        documents=len(used),
        repeated=any(src.repeated.get(split, False) for src in sources),
    )


# --------------------------------------------------------------------------- the step


def check_resources(cfg: SampleConfig, split_tokens: dict[str, int]) -> None:
    """The budgets fit the memory sampling holds them in and the disk the shards go to.

    The disk is the output's (its staging directory is a sibling), or for ``s3://`` the local
    staging directory in the temp dir. Errors name the largest budget, with needed vs available.
    """
    total = sum(split_tokens.values())
    field = f"{max(SPLITS, key=cfg.budget_tokens)}_tokens"
    budgets = f"{total:,} tokens ({', '.join(f'{s} {split_tokens[s]:,}' for s in SPLITS)})"
    need, have = MEMORY_BYTES_PER_TOKEN * total, available_memory()
    if have is not None and need > have:
        raise E3PruneError(
            f"{budgets} need {_gb(need)} of memory while sampling ({MEMORY_BYTES_PER_TOKEN} bytes a token), "
            f"but {_gb(have)} is available; lower {field}",
            field=field,
        )
    s3 = storage.is_s3(cfg.output)
    where = Path(tempfile.gettempdir()) if s3 else Path(cfg.output).absolute()
    while not where.exists():
        where = where.parent
    need, have = DISK_BYTES_PER_TOKEN * total, shutil.disk_usage(where).free
    if need > have:
        raise E3PruneError(
            f"{budgets} need {_gb(need)} of disk ({DISK_BYTES_PER_TOKEN} bytes a token), but {where} has "
            f"{_gb(have)} free; lower {field}{' or point TMPDIR, where s3 outputs are staged, at a larger disk' if s3 else ''}",
            field=field,
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable, capped by the cgroup's (a pod's) limit when it has one."""
    have = None
    try:
        meminfo = Path("/proc/meminfo").read_text()
        have = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    for cgroup, limit, usage, cache in (
        ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),  # cgroup v2
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),  # v1
    ):
        root = Path(cgroup)
        try:
            cap = int((root / limit).read_text())  # "max" (v2 without a limit) raises ValueError
            used = int((root / usage).read_text())
            stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if cap < 1 << 60:  # v1 says "no limit" with a huge number
            room = cap - used + int(stat.get(cache, 0))  # inactive page cache is given back on demand
            have = room if have is None else min(have, room)
        break
    return have


def sample_data(cfg: SampleConfig) -> dict[str, Any]:
    """Sample the three splits, write shards and ``manifest.json`` to ``cfg.output``; return the manifest.

    Everything a user can get wrong — output location, budgets beyond the free memory or disk,
    tokenizer, ``seq_len``, each source's location, format and field, an empty source — is checked
    before tokenizing starts.
    """
    follow_cpu_quota()
    storage.check_output(cfg.output, cfg.overwrite)
    split_tokens = _split_tokens(cfg)
    check_resources(cfg, split_tokens)
    tokenizer = open_tokenizer(cfg.tokenizer, cfg.seq_len)
    sources = [open_source(i, spec, tokenizer) for i, spec in enumerate(cfg.sources)]

    for source, needs in zip(sources, _source_needs(cfg, split_tokens), strict=True):
        _take(source, needs, tokenizer, cfg)
    packed = {s: _pack(s, sources, split_tokens[s], cfg) for s in SPLITS}

    manifest = _manifest(cfg, tokenizer, sources)
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        for split in SPLITS:
            manifest["splits"][split] = _write_split(out, split, packed[split], cfg)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log.info(
        "sampled %s into %s", ", ".join(f"{s} {manifest['splits'][s]['tokens']} tokens" for s in SPLITS), cfg.output
    )
    return manifest


def _manifest(cfg: SampleConfig, tokenizer: Any, sources: list[Source]) -> dict[str, Any]:
    """The manifest without its splits, which :func:`_write_split` fills in as it writes them."""
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "tokenizer": {
            "path": str(Path(cfg.tokenizer).expanduser().resolve()),
            "fingerprint": tokenizer_fingerprint(tokenizer),
        },
        "allow_repeat": cfg.allow_repeat,
        "splits": {},
        "sources": [_source_record(src, cfg) for src in sources],
        "e3prune_version": __version__,
    }


def _write_split(out: Path, split: str, p: PackedSplit, cfg: SampleConfig) -> dict[str, Any]:
    """Write one split's shards of ``cfg.shard_sequences`` sequences under ``out``; return its manifest entry."""
    from safetensors.torch import save_file

    shards = []
    for k, start in enumerate(range(0, len(p.input_ids), cfg.shard_sequences)):
        rel = f"{split}/shard-{k:05d}.safetensors"
        (out / split).mkdir(exist_ok=True)
        chunk = torch.from_numpy(np.ascontiguousarray(p.input_ids[start : start + cfg.shard_sequences]))
        save_file({"input_ids": chunk}, str(out / rel), metadata={"format": "pt"})
        shards.append(rel)
    return {
        "budget_tokens": cfg.budget_tokens(split),
        "sequences": len(p.input_ids),
        "tokens": int(p.input_ids.size),
        "shards": shards,
        "tokens_by_source": p.tokens_by_source,
        "documents": p.documents,
        "repeated": p.repeated,
    }


def _source_record(source: Source, cfg: SampleConfig) -> dict[str, Any]:
    total_weight = sum(s.weight for s in cfg.sources)
    spec = source.spec
    return {
        "name": spec.name,
        "uri": spec.uri,
        "weight": spec.weight,
        "share": spec.weight / total_weight,
        "splits": list(spec.splits),
        "field": {"messages_field": spec.messages_field} if spec.messages_field else {"text_field": spec.text_field},
        "fingerprint": source.fingerprint,
        "documents": source.dataset.num_rows,  # rows in the source, empty ones included
        "documents_read": source.documents_read,  # non-empty documents tokenized and handed to splits
        "tokens_read": source.tokens_read,
        # Known only when the source was read to its end; otherwise the budgets were met first and
        # the rest was never tokenized (null).
        "tokens_available": source.tokens_read if source.exhausted else None,
    }


# --------------------------------------------------------------------------- readers for later stages


def _open(data_uri: str) -> tuple[Path, dict[str, Any]]:
    root = storage.input_dir(data_uri, field="data")
    manifest = storage.read_json_manifest(data_uri, root / MANIFEST, "data", "give the output of `e3prune sample`")
    kind = manifest.get("kind", "teacher_cache" if "top_k" in manifest else KIND)  # older manifests have no kind
    if kind != KIND:
        what = "a teacher cache" if kind == "teacher_cache" else f"an output of kind {kind!r}"
        raise E3PruneError(f"{data_uri} is {what}, not sampled data; give the output of `e3prune sample`", field="data")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise E3PruneError(
            f"{data_uri} has data format {manifest.get('format_version')!r}; this e3prune reads {FORMAT_VERSION}",
            field="data",
        )
    return root, manifest


def read_manifest(data_uri: str) -> dict[str, Any]:
    """The manifest of sampled data at a local path or ``s3://`` URI."""
    return _open(data_uri)[1]


def load_split(data_uri: str, split: str) -> torch.Tensor:
    """One split's sequences as int64 ``(sequences, seq_len)``; an absent or empty split is an error."""
    from safetensors.torch import load_file

    root, manifest = _open(data_uri)
    info = manifest["splits"].get(split)
    if info is None:
        raise E3PruneError(f"{data_uri} has no split {split!r}; it has {', '.join(manifest['splits'])}", field="split")
    if info["sequences"] == 0:
        raise E3PruneError(
            f"split {split!r} of {data_uri} is empty (its budget was 0); sample it with a budget", field="split"
        )
    ids = torch.cat([load_file(str(root / rel))["input_ids"] for rel in info["shards"]]).to(torch.int64)
    if tuple(ids.shape) != (info["sequences"], manifest["seq_len"]):
        raise E3PruneError(
            f"split {split!r} of {data_uri} holds {tuple(ids.shape)} tokens, its manifest says "
            f"({info['sequences']}, {manifest['seq_len']}); sample it again",
            field="data",
        )
    return ids
