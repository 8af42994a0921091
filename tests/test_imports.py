"""The core imports, and runs, where Triton is not installed (its wheels are Linux-only)."""

from __future__ import annotations

import subprocess
import sys

# `sys.modules["triton"] = None` makes every `import triton` raise ImportError, as in a venv
# without it; the script then imports the public API and runs the model and generation.
SCRIPT = """
import sys
sys.modules["triton"] = None
import torch
import leanlm, leanlm.model
from leanlm import kernels
from leanlm.config import ModelConfig
from leanlm.generate import generate
from leanlm.kernels import _triton
assert not _triton.HAS_TRITON
config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=64)
model = leanlm.Transformer(config)
model.init_weights(generator=torch.Generator().manual_seed(0))
with kernels.kernel_mode("triton"):  # even asked for, no kernel is chosen without Triton
    assert not kernels.use_triton(torch.zeros(1))
print(generate(model, [[1, 2, 3]])[0][:4])
"""


def test_core_imports_and_generates_without_triton() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("[")
