"""Kubeflow pipelines of e3-pruner, installed as ``e3prune_pipelines`` (docs/architecture.md)."""
