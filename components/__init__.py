"""Kubeflow Pipelines components of e3-pruner, installed as ``e3prune_components``.

One directory per step, laid out like kubeflow/pipelines-components; each is a thin typed
wrapper over the ``e3prune`` library (docs/architecture.md).
"""
