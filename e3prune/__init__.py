"""e3-pruner: layer pruning of causal LMs following E³-Pruner (see docs/method.md)."""

__version__ = "0.1.0"
