"""Build the ``python_stdlib_cloze`` items from the reference model's held-out corpus.

Each item is a cloze over real code: ``context`` is the lines before a line of a held-out
standard-library file, and ``choices`` are four candidate next lines, the true one and three
lines taken from *other* held-out files. A model that read the context scores the true line
higher; one that did not is at chance (25 %).

What keeps the task about the context, not about surface cues:
- the answer is a line of code (not blank, not a comment, not inside a multi-line string),
  between ``MIN_CHARS`` and ``MAX_CHARS`` characters once stripped;
- every distractor has the answer's exact indentation, so whitespace gives nothing away, is a
  code line by the same rule, and appears nowhere in the answer's file (it cannot be a line that
  would also be right there); the three come from three different files, each drawn uniformly;
- answers are spread over the files round-robin, so the large files do not dominate.

The corpus is held out from the reference model's training, so the items measure how well a
model continues code it has not seen. Deterministic: one seed, files in path order; the result
is committed next to this script and ``tests/test_evaluate.py`` checks that it is up to date.

    python -m e3prune.lm_eval_tasks.build [--check]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import sys
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from e3prune.lm_eval_tasks import CLOZE_DATA

SEED = 20251124
ITEMS = 100
CHOICES = 4
CONTEXT_LINES = 20
MIN_CONTEXT_CODE_LINES = 4  # an answer needs some code before it to be predictable at all
MIN_CHARS = 12
MAX_CHARS = 100
# Keeps every item (context and answer) well inside a 512-position model such as the reference
# one, so that no harness truncates a context and the items mean the same for every model.
MAX_CONTEXT_CHARS = 1000


def read_corpus(path: Path) -> list[dict[str, str]]:
    """The held-out documents (``path``, ``text``), sorted by path."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh if line.strip()]
    return sorted(docs, key=lambda d: d["path"])


def non_code_lines(text: str) -> set[int]:
    """0-based numbers of the lines that lie inside a multi-line string (docstrings, mostly).

    Comment-only lines are excluded by :func:`is_code_line` itself. A file that fails to
    tokenize (no file of the corpus does) counts as all code. Python 3.12+ splits f-strings into
    FSTRING_START … FSTRING_END tokens; their spans count like strings, so that the items do not
    depend on the Python version that builds them.
    """
    fstring_start, fstring_end = getattr(tokenize, "FSTRING_START", None), getattr(tokenize, "FSTRING_END", None)
    inside: set[int] = set()
    open_fstrings: list[int] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            first, last = tok.start[0], tok.end[0]
            if tok.type == fstring_start:
                open_fstrings.append(first)
                continue
            if tok.type == fstring_end:
                first = open_fstrings.pop()
            elif tok.type != tokenize.STRING:
                continue
            if last > first:
                inside.update(range(first - 1, last))
    except (tokenize.TokenError, SyntaxError):
        return set()
    return inside


def is_code_line(line: str) -> bool:
    stripped = line.strip()
    return MIN_CHARS <= len(stripped) <= MAX_CHARS and not stripped.startswith("#")


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def build_items(docs: Sequence[dict[str, str]], n_items: int = ITEMS, seed: int = SEED) -> list[dict[str, Any]]:
    """``n_items`` cloze items (see the module docstring); deterministic for ``docs`` and ``seed``."""
    rng = random.Random(seed)
    lines = [d["text"].splitlines() for d in docs]
    code = []  # per document: the line numbers eligible as an answer or a distractor
    for text, doc_lines in zip((d["text"] for d in docs), lines, strict=True):
        skip = non_code_lines(text)
        code.append([i for i, line in enumerate(doc_lines) if i not in skip and is_code_line(line)])

    # Distractor pool: indentation -> document -> its code lines with that indentation.
    pool: dict[str, dict[int, list[str]]] = {}
    for d, numbers in enumerate(code):
        for i in numbers:
            pool.setdefault(indentation(lines[d][i]), {}).setdefault(d, []).append(lines[d][i])

    # Answer candidates per document, in a seeded order; then round-robin over the documents.
    candidates = []
    for numbers in code:
        is_code = set(numbers)
        eligible = [
            i
            for i in numbers
            if i >= CONTEXT_LINES
            and sum(1 for j in range(i - CONTEXT_LINES, i) if j in is_code) >= MIN_CONTEXT_CODE_LINES
        ]
        rng.shuffle(eligible)
        candidates.append(eligible)

    items: list[dict[str, Any]] = []
    while len(items) < n_items and any(candidates):
        for d in range(len(docs)):
            if len(items) == n_items:
                break
            while candidates[d]:
                i = candidates[d].pop()
                item = _item(d, i, docs, lines, pool, rng)
                if item is not None:
                    items.append(item)
                    break
    if len(items) < n_items:
        raise ValueError(f"the corpus yields only {len(items)} items, {n_items} were asked for")
    for k, item in enumerate(items):
        item["id"] = k
    return items


def _item(
    d: int,
    i: int,
    docs: Sequence[dict[str, str]],
    lines: list[list[str]],
    pool: dict[str, dict[int, list[str]]],
    rng: random.Random,
) -> dict[str, Any] | None:
    """The item whose answer is line ``i`` of document ``d``, or None when it has too few distractors."""
    answer = lines[d][i]
    context = "\n".join(lines[d][i - CONTEXT_LINES : i]) + "\n"
    if len(context) > MAX_CONTEXT_CHARS:
        return None
    in_document = {line.strip() for line in lines[d]}
    # Documents first, then a line in each: a file of thousands of look-alike lines (the codec
    # tables of ``encodings``) would otherwise supply most distractors, and easy ones.
    sources = {
        e: fitting
        for e, candidates in pool.get(indentation(answer), {}).items()
        if e != d and (fitting := [line for line in candidates if line.strip() not in in_document])
    }
    if len(sources) < CHOICES - 1:
        return None
    distractors = [rng.choice(sources[e]) for e in rng.sample(sorted(sources), CHOICES - 1)]
    if len(set(distractors)) < CHOICES - 1:
        return None
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {
        "id": -1,
        "path": docs[d]["path"],
        "line": i + 1,
        # Ends with a newline: the choice is the whole next line, indentation included.
        "context": context,
        "choices": choices,
        "label": choices.index(answer),
    }


def render(items: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def main(argv: Sequence[str] | None = None) -> int:
    from e3prune.data_sources import builtin_corpus

    parser = argparse.ArgumentParser(prog="python -m e3prune.lm_eval_tasks.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs from a rebuild")
    args = parser.parse_args(argv)
    text = render(build_items(read_corpus(builtin_corpus())))
    if args.check:
        current = CLOZE_DATA.read_text(encoding="utf-8") if CLOZE_DATA.is_file() else ""
        if current != text:
            print(f"{CLOZE_DATA} is out of date; run python -m e3prune.lm_eval_tasks.build", file=sys.stderr)
            return 1
        print(f"{CLOZE_DATA} is up to date")
        return 0
    CLOZE_DATA.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} items to {CLOZE_DATA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
