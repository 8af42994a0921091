"""Training on torch.distributed: the loop, parallelisms, distributed checkpoints, recipes, and
what runs the loop: instruction tuning with adapters (``finetune.py``) and DoReMi's proxy
training (``doremi.py``)."""

from leanlm.train.config import TrainConfig
from leanlm.train.recipes import RECIPES, get_recipe

__all__ = ["RECIPES", "TrainConfig", "get_recipe"]
