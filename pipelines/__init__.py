"""Kubeflow pipelines of e3-pruner, installed as ``e3prune_pipelines`` (ARCHITECTURE.md).

The compression pipeline arrives with the pipeline issue; this package exists so that the
installed layout is already the final one.
"""
