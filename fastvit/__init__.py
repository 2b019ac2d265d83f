"""fastvit: train a Vision Transformer on ImageNet from scratch on one GPU within a wall-clock budget.

Sub-packages, one per stage of the data's journey (see README):
    fastvit.data_prep  offline shard writers (`fastvit-prep`; lives in the repo's data_prep/ folder)
    fastvit.data       loaders and the image-size curriculum
    fastvit.kernels    Triton kernels with pure-PyTorch references (repo folder kernels/)
    fastvit.models     locality ViT
    fastvit.train      `fastvit-train`, schedules, planner, checkpoints
"""

__version__ = "0.1.0"
