"""What the command modules share: the MODEL argument and its default (the embedded model), and
the size of a checkpoint's weights. Bottom layer: typer and the standard library only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

INT8_ACTIVATIONS_HELP = (
    "4- and 8-bit layers on the CPU round their activations to int8 per group and multiply on "
    "AVX512-VNNI, as llama.cpp's Q4_0/Q8_0 do: faster, slightly different logits "
    "(LEANLM_INT8_ACTIVATIONS=1).")
ModelArg = Annotated[Path | None, typer.Argument(
    help="Hugging Face model directory (config.json + safetensors + tokenizer.json); "
         "default: the model shipped with leanlm.", show_default=False)]


def resolve_model(model: Path | None) -> Path:
    """The model directory to use: the one given, else the embedded default model."""
    if model is not None:
        return model
    from leanlm.assets import default_model_path

    return default_model_path()


def weights_bytes(path: Path) -> int:
    """Bytes of the ``*.safetensors`` files of a checkpoint directory."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
