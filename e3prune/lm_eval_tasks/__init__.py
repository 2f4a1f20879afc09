"""lm-evaluation-harness tasks shipped with e3prune (docs/method.md, Stage 6).

This directory is an lm-eval *include path*: ``TaskManager(include_path=TASK_DIR)`` (or
``lm-eval run --include_path``) finds the task YAML files in it. Their data live here too, so
they run without a download.

- ``python_stdlib_cloze``: 100 multiple-choice next-line items over the reference model's
  held-out Python standard-library files (``build.py`` makes them; metrics ``acc``, ``acc_norm``).

``adapter.py`` runs tasks (these or lm-eval's own) on models already in memory for the evaluate
step: it checks the task names and calls lm-eval's Python API.
"""

from pathlib import Path

#: The include path to hand to lm-eval's TaskManager.
TASK_DIR = Path(__file__).resolve().parent
#: The tasks defined in TASK_DIR (their YAML ``task`` names).
SHIPPED_TASKS = ("python_stdlib_cloze",)
#: The committed items of ``python_stdlib_cloze`` (one JSON object a line).
CLOZE_DATA = TASK_DIR / "python_stdlib_cloze.jsonl"
