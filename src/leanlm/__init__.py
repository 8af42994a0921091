"""leanlm: one PyTorch model definition, every efficiency technique, measured against peers.

The public API: ``load_model`` / ``save_model`` (Hugging Face checkpoints), ``load_tokenizer``,
the ``Transformer`` and its ``ModelConfig`` (with ``PRESETS``), ``apply_peft_`` / ``load_adapter``
(adapters, :mod:`leanlm.peft`), and ``LeanLMError`` for bad input.
"""

from leanlm.assets import DEFAULT_MODEL, DRAFT_MODEL
from leanlm.checkpoint import load_model, save_model
from leanlm.config import PRESETS, ModelConfig
from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.peft import apply_peft_, load_adapter
from leanlm.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "DRAFT_MODEL", "PRESETS", "LeanLMError", "ModelConfig", "Tokenizer",
           "Transformer", "apply_peft_", "load_adapter", "load_model", "load_tokenizer", "save_model"]
