"""The one setting every component's ``base_image`` comes from (images/README.md).

The image has e3-pruner (and kfp) installed, so components install nothing at run time:
``install_kfp_package=False`` and no ``packages_to_install``; air-gapped clusters work. To use
your own build, set ``E3PRUNE_IMAGE`` (and ``E3PRUNE_CUDA_IMAGE`` for the GPU pipeline) when
compiling (``E3PRUNE_IMAGE=registry/e3-pruner:tag e3prune compile``); the committed YAML uses the
defaults below.
"""

import os

from e3prune import __version__

DEFAULT_IMAGE = f"ghcr.io/e3-pruner/e3-pruner:{__version__}-cpu"
IMAGE = os.environ.get("E3PRUNE_IMAGE") or DEFAULT_IMAGE
DEFAULT_CUDA_IMAGE = f"ghcr.io/e3-pruner/e3-pruner:{__version__}-cuda"  # images/cuda/Dockerfile
CUDA_IMAGE = os.environ.get("E3PRUNE_CUDA_IMAGE") or DEFAULT_CUDA_IMAGE
