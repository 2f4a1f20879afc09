"""Stage 0's sources (docs/method.md): where a source's documents come from and how they become tokens.

A source (:class:`SourceSpec`) is ``builtin:reference`` (the reference model's shipped held-out
corpus), ``builtin:reference-train`` (its training files, rebuilt from this Python's standard
library as ``e3prune reference-model build`` selects them), a local jsonl / json / parquet / text
file or a directory of them (one format per source), or a Hugging Face hub dataset id. A source
may be limited to some splits (``splits``), e.g. held-out text for ``eval`` only. Each row is one document: the text of ``text_field``, or the chat
messages of ``messages_field`` rendered with the tokenizer's chat template.

Opening a source checks, before anything is tokenized, that it exists, loads, has the field and
holds a non-empty document, and fingerprints it (sha256 of a local source's files, the hub
dataset's own fingerprint) for the manifest. :func:`documents` then yields its non-empty
documents in a seeded order, tokenized in batches only as far as the sampler asks.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from e3prune import reference
from e3prune.errors import E3PruneError

BUILTIN_REFERENCE = "builtin:reference"
# The reference model's training files (about 3 M tokens): enough for search and distillation
# budgets that never repeat a sequence. Never fit for eval: the model was trained on them.
BUILTIN_REFERENCE_TRAIN = "builtin:reference-train"
BUILTIN_SOURCES = (BUILTIN_REFERENCE, BUILTIN_REFERENCE_TRAIN)
SPLIT_NAMES = ("search", "distill", "eval")
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
    f"{BUILTIN_REFERENCE}, {BUILTIN_REFERENCE_TRAIN}, a local {'/'.join(FORMATS)} file or a directory of them, "
    "or a Hugging Face hub dataset id like 'org/name'"
)
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
TOKENIZE_BATCH_DOCS = 256


def builtin_corpus() -> Path:
    """The shipped held-out corpus of the reference model (jsonl.gz of ``{"path", "text"}``)."""
    # Looked up at call time: MODEL_DIR is the one place that says where the reference model is.
    return reference.MODEL_DIR / "heldout_corpus.jsonl.gz"


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
    splits: list[Literal["search", "distill", "eval"]] = Field(
        default_factory=lambda: list(SPLIT_NAMES),
        min_length=1,
        description="the sampled splits this source feeds (default all), e.g. [eval] for held-out text only",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"uri": data}
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("uri"), str):
            data = {**data, "name": _default_name(data["uri"])}
        return data

    @field_validator("splits")
    @classmethod
    def _distinct_splits(cls, splits: list[str]) -> list[str]:
        if len(set(splits)) != len(splits):
            raise ValueError(f"name each split once, got {splits}")
        return splits


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


def open_tokenizer(model_dir: str, seq_len: int):
    """The tokenizer of ``model_dir``, checked: it loads, has EOS, and ``seq_len`` fits the model's positions.

    Errors name the sampler's fields ``tokenizer`` and ``seq_len``.
    """
    from e3prune.model_io import load_tokenizer

    p = Path(model_dir).expanduser()
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
    if positions is not None and seq_len > positions:
        raise E3PruneError(
            f"{seq_len} is longer than the model's {positions} positions (max_position_embeddings); "
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
        if uri not in BUILTIN_SOURCES:
            raise E3PruneError(
                f"unknown built-in source {uri!r}; the built-in sources are {', '.join(BUILTIN_SOURCES)}",
                field=field_name,
            )
        if uri == BUILTIN_REFERENCE_TRAIN:
            return "reference-train", uri
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


def open_source(index: int, spec: SourceSpec, tokenizer: Any) -> Source:
    """Load one source and check, before any tokenizing, that it has the field and a document."""
    from datasets import load_dataset

    kind, target = _resolve(index, spec)
    if kind == "reference-train":
        dataset, fingerprint = reference_train_dataset()
        return _checked_source(index, spec, tokenizer, dataset, fingerprint)
    try:
        if kind == "local":
            files = target
            builder = _data_format(files[0]) or "json"
            with _quiet_datasets():  # a bad file is reported below, once, not also in the loader's log
                dataset = load_dataset(builder, data_files={"train": [str(f) for f in files]}, split="train")
            fingerprint = _files_fingerprint(files)
        else:
            dataset = load_dataset(target, split=spec.split)
            fingerprint = dataset._fingerprint
    except Exception as exc:  # noqa: BLE001 - any loader failure is the user's source; say which and why
        problem = next(filter(None, map(_file_problem, target)), None) if kind == "local" else None
        if problem is not None:
            raise E3PruneError(f"source {spec.name!r}: {problem}", field=f"sources.{index}.uri") from None
        what = "as a Hugging Face hub dataset" if kind == "hub" else "as data files"
        raise E3PruneError(
            f"cannot load {spec.uri!r} {what}: {type(exc).__name__}: {exc}", field=f"sources.{index}.uri"
        ) from None
    return _checked_source(index, spec, tokenizer, dataset, fingerprint)


# A training file sharing more than this share of its word 16-grams with the held-out corpus is a
# near-copy of a held-out file (the standard library's codec tables, encodings/cp*.py, are the
# bulk) and is left out of builtin:reference-train, so that eval text is not search or distill text.
NEAR_COPY_NGRAM = 16
NEAR_COPY_SHARE = 0.25


def _word_ngrams(text: str, n: int = NEAR_COPY_NGRAM) -> set[int]:
    words = text.split()
    return {hash(tuple(words[i : i + n])) for i in range(max(0, len(words) - n + 1))}


@functools.lru_cache(maxsize=1)  # a few seconds to rebuild; one process samples several times in tests
def reference_train_dataset() -> tuple[Any, str]:
    """``builtin:reference-train``: the reference model's training files as a dataset of ``{"path", "text"}``.

    Rebuilt by :func:`e3prune.reference.build.train_documents`, the selection the build trains on
    (disjoint by path from the held-out files), less the near-copies of held-out files: any file
    whose word 16-grams are more than ``NEAR_COPY_SHARE`` in the shipped held-out corpus
    (``builtin:reference``). With Python 3.11.7 that leaves 526 of 600 files, 2,608,367 tokens with
    the reference tokenizer (docs/method.md, Stage 0). The fingerprint is the sha256 of the paths and
    texts: it changes with the standard library.
    """
    from datasets import Dataset

    from e3prune.reference.build import train_documents, without_near_copies

    heldout: list[str] = []
    if builtin_corpus().is_file():
        with gzip.open(builtin_corpus(), "rt", encoding="utf-8") as fh:
            heldout = [json.loads(line)["text"] for line in fh if line.strip()]
    docs = without_near_copies(train_documents(), heldout)
    h = hashlib.sha256()
    for d in docs:
        h.update(d.path.encode() + b"\0" + d.text.encode("utf-8", errors="replace") + b"\0")
    return Dataset.from_dict({"path": [d.path for d in docs], "text": [d.text for d in docs]}), h.hexdigest()


def _checked_source(index: int, spec: SourceSpec, tokenizer: Any, dataset: Any, fingerprint: str) -> Source:
    """The loaded dataset as a :class:`Source`, checked for its field, the chat template and a document."""
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


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the `datasets` loggers (its JSON reader logs a parse error before raising it)."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _file_problem(path: Path) -> str | None:
    """Why a local source file cannot be read as its format (empty, not UTF-8 text, not JSON lines), or None.

    Called only after the loader failed, so reading the whole file costs nothing in a run that works.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return f"{path} cannot be read ({exc})"
    if not data.strip():
        return f"{path} is empty ({'0 bytes' if not data else 'only blank lines'}); give a file with documents"
    if _data_format(path) == "parquet":
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); is it a binary file?"
    if _data_format(path) != "json":
        return None
    if path.name.lower().endswith((".json", ".json.gz")):
        try:
            json.loads(text)  # one JSON document (a list of rows) is allowed as well as JSON lines
            return None
        except ValueError:
            pass
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError as exc:
            return f"{path} is not valid JSON lines (line {n}: {exc}); give one JSON object a line"
        if not isinstance(row, dict):
            return f"{path} is not valid JSON lines (line {n} is a {type(row).__name__}); give one JSON object a line"
    return None


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


# --------------------------------------------------------------------------- documents


def _stable_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def documents(source: Source, tokenizer: Any, seed: int) -> Iterator[Document]:
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
