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
the tokens that are sampled, not its whole size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from e3prune import __version__, reference, storage
from e3prune.config import StepConfig
from e3prune.errors import E3PruneError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("search", "distill", "eval")  # the order of the manifest
FILL_ORDER = ("eval", "search", "distill")  # eval first: it must not move when other budgets change
BUILTIN_REFERENCE = "builtin:reference"
# Suffix -> the `datasets` builder that reads it. Longest suffixes first so ".jsonl.gz" wins over ".gz".
FORMATS = {
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
ALLOWED_SOURCES = (
    f"{BUILTIN_REFERENCE}, a local {'/'.join(FORMATS)} file or a directory of them, "
    "or a Hugging Face hub dataset id like 'org/name'"
)
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
TOKENIZE_BATCH_DOCS = 256


def builtin_corpus() -> Path:
    """The shipped held-out corpus of the reference model (jsonl.gz of ``{"path", "text"}``)."""
    # Looked up at call time: MODEL_DIR is the one place that says where the reference model is.
    return reference.MODEL_DIR / "heldout_corpus.jsonl.gz"


def _default_tokenizer() -> str:
    return str(reference.MODEL_DIR)


def _data_format(path: Path) -> str | None:
    name = path.name.lower()
    return next((builder for suffix, builder in FORMATS.items() if name.endswith(suffix)), None)


def _default_name(uri: str) -> str:
    """``builtin:reference`` -> ``reference``; ``data/train.jsonl.gz`` -> ``train``; a hub id stays itself."""
    if uri.startswith("builtin:"):
        return uri.removeprefix("builtin:")
    p = Path(uri.rstrip("/")).expanduser()
    if HUB_ID.match(uri) and _data_format(p) is None and not p.exists():
        return uri
    suffix = next((s for s in FORMATS if p.name.lower().endswith(s)), "")
    return p.name[: len(p.name) - len(suffix)] or p.name or uri


class SourceSpec(BaseModel):
    """One data source of the mixture."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(min_length=1, description=ALLOWED_SOURCES)
    name: str = Field("", description="label in the manifest; default: derived from the uri")
    weight: float = Field(1.0, gt=0, description="mixture weight; normalised over the sources")
    text_field: str = Field("text", min_length=1, description="column holding the document text")
    messages_field: str | None = Field(
        None, min_length=1, description="column holding chat messages, rendered with the tokenizer's chat template"
    )
    split: str = Field("train", min_length=1, description="split of a hub dataset (local files have one)")

    @model_validator(mode="before")
    @classmethod
    def _derive_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"uri": data}
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("uri"), str):
            data = {**data, "name": _default_name(data["uri"])}
        return data


class SampleConfig(StepConfig):
    """Stage 0: what to sample, how much of it, and where to write it."""

    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(uri=BUILTIN_REFERENCE)], min_length=1)
    tokenizer: str = Field(default_factory=_default_tokenizer, description="model directory whose tokenizer to use")
    seq_len: int = Field(256, ge=2, description="tokens per packed sequence; at most the model's positions")
    search_tokens: int = Field(65536, ge=0, description="budget of the search split (0: empty split)")
    distill_tokens: int = Field(131072, ge=0, description="budget of the distill split (0: empty split)")
    eval_tokens: int = Field(65536, ge=0, description="budget of the eval split (0: empty split)")
    seed: int = Field(0, ge=0)
    allow_repeat: bool = Field(False, description="cycle a split's own documents when a source runs out")
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

    def budget_tokens(self, split: str) -> int:
        return {"search": self.search_tokens, "distill": self.distill_tokens, "eval": self.eval_tokens}[split]


@dataclass(frozen=True)
class Document:
    source: int  # index into the config's sources
    row: int  # row in the source dataset: the document's identity, for disjointness
    ids: np.ndarray  # int32 token ids, EOS last


@dataclass
class Source:
    """A loaded source: the dataset, how to turn a row into text, and what was taken from it."""

    index: int
    spec: SourceSpec
    dataset: Any  # datasets.Dataset
    column: str
    render: Callable[[Any, int], str]
    fingerprint: str
    tokens_read: int = 0
    documents_read: int = 0
    exhausted: bool = False
    taken: dict[str, list[Document]] = field(default_factory=dict)
    repeated: dict[str, bool] = field(default_factory=dict)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what maps text to ids: equal fingerprints mean equal token ids.

    For a fast tokenizer that is its serialised ``tokenizers`` pipeline, without the padding and
    truncation settings (runtime options that transformers toggles per call). For any other
    tokenizer, its vocabulary with the added tokens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- checks and loading


def _load_tokenizer(cfg: SampleConfig):
    from e3prune.model_io import load_tokenizer

    p = Path(cfg.tokenizer).expanduser()
    if not p.is_dir():
        raise E3PruneError(f"{p} is not a directory; give a model directory that holds a tokenizer", field="tokenizer")
    try:
        tokenizer = load_tokenizer(p)
    except (OSError, ValueError) as exc:
        raise E3PruneError(f"the tokenizer in {p} cannot be loaded: {exc}", field="tokenizer") from None
    if tokenizer is None:
        raise E3PruneError(f"{p} has no tokenizer (tokenizer.json / tokenizer_config.json)", field="tokenizer")
    if tokenizer.eos_token_id is None:
        raise E3PruneError(f"the tokenizer in {p} has no EOS token, which separates documents", field="tokenizer")
    positions = _max_positions(p)
    if positions is not None and cfg.seq_len > positions:
        raise E3PruneError(
            f"{cfg.seq_len} is longer than the model's {positions} positions (max_position_embeddings); "
            f"use at most {positions}",
            field="seq_len",
        )
    return tokenizer


def _max_positions(model_dir: Path) -> int | None:
    """``max_position_embeddings`` from the directory's config.json (or its ``text_config``), if any."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError:
        return None
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("max_position_embeddings"), int):
            return c["max_position_embeddings"]
    return None


def _resolve(index: int, spec: SourceSpec) -> tuple[str, list[Path] | str]:
    """``("local", [files])`` or ``("hub", dataset_id)``, or an error saying what the uri may be."""
    field_name = f"sources.{index}.uri"
    uri = spec.uri
    if uri.startswith("builtin:"):
        if uri != BUILTIN_REFERENCE:
            raise E3PruneError(
                f"unknown built-in source {uri!r}; the built-in source is {BUILTIN_REFERENCE}", field=field_name
            )
        corpus = builtin_corpus()
        if not corpus.is_file():
            raise E3PruneError(
                f"the reference model's corpus {corpus} is missing; reinstall e3-pruner or rebuild the reference model",
                field=field_name,
            )
        return "local", [corpus]
    if "://" in uri:
        raise E3PruneError(f"unknown source format {uri!r}; allowed: {ALLOWED_SOURCES}", field=field_name)
    p = Path(uri).expanduser()
    if p.is_file():
        if _data_format(p) is None:
            raise E3PruneError(f"unknown source format of {p}; allowed: {ALLOWED_SOURCES}", field=field_name)
        return "local", [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _data_format(f) is not None)
        if not files:
            raise E3PruneError(f"{p} holds no {'/'.join(FORMATS)} files", field=field_name)
        builders = {_data_format(f) for f in files}
        if len(builders) > 1:
            raise E3PruneError(
                f"{p} mixes formats ({', '.join(sorted(builders))}); give one format per source", field=field_name
            )
        return "local", files
    if uri.startswith(("/", ".", "~")) or _data_format(p) is not None or not HUB_ID.match(uri):
        raise E3PruneError(
            f"{p.absolute()} does not exist (a local source must be an existing file or directory)", field=field_name
        )
    return "hub", uri


def _files_fingerprint(files: list[Path]) -> str:
    """sha256 over the files' names and bytes: changes when any source file does."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _open_source(index: int, spec: SourceSpec, tokenizer: Any) -> Source:
    """Load one source and check, before any tokenizing, that it has the field and a document."""
    from datasets import load_dataset

    kind, target = _resolve(index, spec)
    try:
        if kind == "local":
            files = target
            builder = _data_format(files[0]) or "json"
            dataset = load_dataset(builder, data_files={"train": [str(f) for f in files]}, split="train")
            fingerprint = _files_fingerprint(files)
        else:
            dataset = load_dataset(target, split=spec.split)
            fingerprint = dataset._fingerprint
    except Exception as exc:  # noqa: BLE001 - any loader failure is the user's source; say which and why
        what = "as a Hugging Face hub dataset" if kind == "hub" else "as data files"
        raise E3PruneError(
            f"cannot load {spec.uri!r} {what}: {type(exc).__name__}: {exc}", field=f"sources.{index}.uri"
        ) from None

    field_kind = "messages_field" if spec.messages_field else "text_field"
    column = spec.messages_field or spec.text_field
    if column not in dataset.column_names:
        raise E3PruneError(
            f"source {spec.name!r} ({spec.uri}) has no field {column!r}; its fields are: "
            f"{', '.join(dataset.column_names)}",
            field=f"sources.{index}.{field_kind}",
        )
    if spec.messages_field and not getattr(tokenizer, "chat_template", None):
        raise E3PruneError(
            f"the tokenizer has no chat template to render source {spec.name!r}'s messages with; "
            "use a tokenizer that has one, or give plain text with text_field",
            field=f"sources.{index}.messages_field",
        )
    render = _chat_renderer(index, spec, tokenizer) if spec.messages_field else _text_renderer(index, spec)
    source = Source(index, spec, dataset.select_columns([column]), column, render, fingerprint)
    _check_not_empty(source)
    return source


def _text_renderer(index: int, spec: SourceSpec) -> Callable[[Any, int], str]:
    def render(value: Any, row: int) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise E3PruneError(
                f"source {spec.name!r} row {row}: field {spec.text_field!r} holds {type(value).__name__}, not text; "
                "point text_field at a text column, or messages_field at chat messages",
                field=f"sources.{index}.text_field",
            )
        return value

    return render


def _chat_renderer(index: int, spec: SourceSpec, tokenizer: Any) -> Callable[[Any, int], str]:
    def render(value: Any, row: int) -> str:
        if value is None or (isinstance(value, list) and not value):
            return ""
        if not (isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)):
            raise E3PruneError(
                f"source {spec.name!r} row {row}: field {spec.messages_field!r} is not a list of "
                "{'role', 'content'} messages",
                field=f"sources.{index}.messages_field",
            )
        try:
            return tokenizer.apply_chat_template(value, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template error is about the data or the template
            raise E3PruneError(
                f"source {spec.name!r} row {row}: the chat template cannot render these messages: {exc}",
                field=f"sources.{index}.messages_field",
            ) from None

    return render


def _check_not_empty(source: Source) -> None:
    """Scan in file order up to the first non-empty document (usually the first row)."""
    n = source.dataset.num_rows
    for start in range(0, n, 1024):
        values = source.dataset[start : start + 1024][source.column]
        if any(source.render(v, start + k).strip() for k, v in enumerate(values)):
            return
    raise E3PruneError(
        f"source {source.spec.name!r} ({source.spec.uri}) has no non-empty documents in field {source.column!r} "
        f"({n} rows)",
        field=f"sources.{source.index}.uri",
    )


# --------------------------------------------------------------------------- sampling


def _stable_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _documents(source: Source, tokenizer: Any, seed: int) -> Iterator[Document]:
    """The source's non-empty documents in a seeded random order, tokenized in batches as needed.

    The order depends on the seed and the source's *name*, not its position in the list, so
    adding another source does not reshuffle this one.
    """
    n = source.dataset.num_rows
    order = np.random.default_rng([seed, 0, _stable_int(source.spec.name)]).permutation(n)
    eos = tokenizer.eos_token_id
    for start in range(0, n, TOKENIZE_BATCH_DOCS):
        rows = order[start : start + TOKENIZE_BATCH_DOCS].tolist()
        values = source.dataset[rows][source.column]
        texts = [(row, source.render(v, row)) for row, v in zip(rows, values, strict=True)]
        texts = [(row, t) for row, t in texts if t.strip()]
        if not texts:
            continue
        encoded = tokenizer(
            [t for _, t in texts], add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        for (row, _), ids in zip(texts, encoded, strict=True):
            arr = np.empty(len(ids) + 1, dtype=np.int32)
            arr[:-1] = ids
            arr[-1] = eos
            yield Document(source.index, row, arr)


def _split_tokens(cfg: SampleConfig) -> dict[str, int]:
    """Tokens per split: the budget rounded up to whole sequences."""
    return {s: math.ceil(cfg.budget_tokens(s) / cfg.seq_len) * cfg.seq_len for s in SPLITS}


def _source_needs(cfg: SampleConfig, split_tokens: dict[str, int]) -> list[dict[str, int]]:
    """Tokens each source owes each split: its normalised weight of the split's tokens, rounded up.

    Rounding up per source makes the sum reach the split's total, so packing never runs short;
    exact fractions keep float rounding from undercutting that by a token.
    """
    total_weight = sum(Fraction(s.weight) for s in cfg.sources)
    return [
        {s: math.ceil(split_tokens[s] * Fraction(src.weight) / total_weight) for s in SPLITS} for src in cfg.sources
    ]


def _take(source: Source, needs: dict[str, int], tokenizer: Any, cfg: SampleConfig) -> None:
    """Hand the source's shuffled documents to eval, then search, then distill (docs/method.md, Stage 0)."""
    from tqdm.auto import tqdm

    docs = _documents(source, tokenizer, cfg.seed)
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


def sample_data(cfg: SampleConfig) -> dict[str, Any]:
    """Sample the three splits, write shards and ``manifest.json`` to ``cfg.output``; return the manifest.

    Everything a user can get wrong — output location, tokenizer, ``seq_len``, each source's
    location, format and field, an empty source — is checked before tokenizing starts.
    """
    from safetensors.torch import save_file

    storage.check_output(cfg.output, cfg.overwrite)
    tokenizer = _load_tokenizer(cfg)
    sources = [_open_source(i, spec, tokenizer) for i, spec in enumerate(cfg.sources)]

    split_tokens = _split_tokens(cfg)
    for source, needs in zip(sources, _source_needs(cfg, split_tokens), strict=True):
        _take(source, needs, tokenizer, cfg)
    packed = {s: _pack(s, sources, split_tokens[s], cfg) for s in SPLITS}

    manifest: dict[str, Any] = {
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
    with storage.output_dir(cfg.output, cfg.overwrite) as out:
        for split in SPLITS:
            p = packed[split]
            shards = []
            for k, start in enumerate(range(0, len(p.input_ids), cfg.shard_sequences)):
                rel = f"{split}/shard-{k:05d}.safetensors"
                (out / split).mkdir(exist_ok=True)
                chunk = torch.from_numpy(np.ascontiguousarray(p.input_ids[start : start + cfg.shard_sequences]))
                save_file({"input_ids": chunk}, str(out / rel), metadata={"format": "pt"})
                shards.append(rel)
            manifest["splits"][split] = {
                "budget_tokens": cfg.budget_tokens(split),
                "sequences": len(p.input_ids),
                "tokens": int(p.input_ids.size),
                "shards": shards,
                "tokens_by_source": p.tokens_by_source,
                "documents": p.documents,
                "repeated": p.repeated,
            }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log.info(
        "sampled %s into %s", ", ".join(f"{s} {manifest['splits'][s]['tokens']} tokens" for s in SPLITS), cfg.output
    )
    return manifest


def _source_record(source: Source, cfg: SampleConfig) -> dict[str, Any]:
    total_weight = sum(s.weight for s in cfg.sources)
    spec = source.spec
    return {
        "name": spec.name,
        "uri": spec.uri,
        "weight": spec.weight,
        "share": spec.weight / total_weight,
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
    path = root / MANIFEST
    if not path.is_file():
        raise E3PruneError(f"{data_uri} is not sampled data: it has no {MANIFEST}; run `e3prune sample`", field="data")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise E3PruneError(f"{data_uri}/{MANIFEST} is not valid JSON: {exc}", field="data") from None
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
