"""leanlm: one PyTorch model definition, every efficiency technique, measured against peers.

The public API: ``load_model`` / ``save_model`` (Hugging Face checkpoints), ``load_tokenizer``,
the ``Transformer`` and its ``ModelConfig`` (with ``PRESETS``), ``SamplingParams``,
``apply_peft_`` / ``load_adapter`` (adapters, :mod:`leanlm.peft`), and ``LeanLMError`` for bad
input. Importing the package also imports :mod:`leanlm.quant`, whose checkpoint formats
(GPTQ, AWQ, w8a8) register themselves with ``load_model``.
"""

from leanlm.assets import DEFAULT_MODEL, DRAFT_MODEL
from leanlm.checkpoint import load_model, save_model
from leanlm.config import PRESETS, ModelConfig
from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.peft import apply_peft_, load_adapter
from leanlm.quant import formats as _quant_formats  # noqa: F401 (registers the quantized formats)
from leanlm.sampling import SamplingParams
from leanlm.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = [
           "DEFAULT_MODEL",
           "DRAFT_MODEL",
           "PRESETS",
           "LeanLMError",
           "ModelConfig",
           "SamplingParams",
           "Tokenizer",
           "Transformer",
           "apply_peft_",
           "load_adapter",
           "load_model",
           "load_tokenizer",
           "save_model",
]
