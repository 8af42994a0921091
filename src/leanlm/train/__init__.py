"""Pretraining on torch.distributed: the loop, parallelisms, distributed checkpoints, recipes."""

from leanlm.train.config import TrainConfig
from leanlm.train.recipes import RECIPES, get_recipe

__all__ = ["RECIPES", "TrainConfig", "get_recipe"]
