"""fastvit: train a Vision Transformer on ImageNet from scratch on one GPU within a wall-clock budget.

Sub-packages, one per stage of the data's journey (see README):
    fastvit.data_prep  offline shard writers (`fastvit-prep`; lives in the repo's data_prep/ folder)
    fastvit.data       loaders and the image-size curriculum
    fastvit.kernels    Triton kernels with pure-PyTorch references (repo folder kernels/)
    fastvit.models     locality ViT
    fastvit.train      `fastvit-train`, schedules, planner, checkpoints
"""

__version__ = "0.1.0"


def _checkout_subpackages() -> None:
    """Run from a checkout with only `PYTHONPATH=<repo>` (no install: e.g. a GPU machine without
    network), fastvit.kernels and fastvit.data_prep live in the repo-root folders kernels/ and
    data_prep/ (pyproject's package-dir mapping does the same for an install). The repo root is added
    to this package's search path only in a checkout (pyproject.toml beside it) whose fastvit/ lacks
    those folders, so an installed wheel never looks outside itself."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return
    if all(os.path.isfile(os.path.join(root, sub, "__init__.py")) and not os.path.isdir(os.path.join(here, sub))
           for sub in ("kernels", "data_prep")) and root not in __path__:
        __path__.append(root)


_checkout_subpackages()
