"""The shipped reference model (see ``model/README.md`` for its card)."""

from pathlib import Path

#: Directory of the shipped, trained checkpoint: the embedded default model.
MODEL_DIR = Path(__file__).resolve().parent / "model"


def default_model() -> str:
    """The embedded default for every ``model`` setting: the shipped reference model."""
    return str(MODEL_DIR)
