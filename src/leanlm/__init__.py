"""leanlm: one PyTorch model definition, every efficiency technique, measured against peers."""

from leanlm.checkpoint import load_model, save_model
from leanlm.config import PRESETS, ModelConfig
from leanlm.errors import LeanLMError
from leanlm.model import Transformer

__version__ = "0.1.0"
__all__ = ["PRESETS", "LeanLMError", "ModelConfig", "Transformer", "load_model", "save_model"]
