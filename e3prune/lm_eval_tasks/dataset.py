"""The loader that ``python_stdlib_cloze.yaml`` names as its ``custom_dataset``.

Why not ``dataset_path: json`` with ``dataset_kwargs.data_files``: lm-eval hands ``data_files``
to ``datasets.load_dataset`` as written, and a relative path there is resolved against the
process's working directory, not against the YAML file. The items are found next to this file
instead, wherever the package is installed; a ``!function`` in the YAML is resolved relative
to the YAML, so this works for ``TaskManager(include_path=...)`` and ``lm-eval run
--include_path`` alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ITEMS_FILE = Path(__file__).resolve().parent / "python_stdlib_cloze.jsonl"


def load_python_stdlib_cloze(**_: Any):
    """The items as a ``DatasetDict`` with one ``test`` split.

    lm-eval calls a ``custom_dataset`` with the task's metadata and ``dataset_kwargs`` as
    keyword arguments; this task takes none of them.
    """
    import datasets

    with open(ITEMS_FILE, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
