"""Calibration data and layer-by-layer execution for the calibrated methods (GPTQ, AWQ, SmoothQuant).

Samples follow the GPTQ protocol: the texts are tokenized into one ``<eos>``-separated stream
and ``n_samples`` windows of ``seq_len`` tokens start at seeded random offsets. Where the texts
come from (a file, a corpus, the standard library) is the data layer's business
(:mod:`leanlm.data.text`): this module takes any iterable of strings.

:class:`LayerInputs` holds the inputs of one transformer block for every calibration sample
(in micro-batches, with their attention metadata). A method quantizes block ``l`` from them,
then :meth:`LayerInputs.advance` replaces them by the block's outputs, so only one block's
activations are ever in memory: a model whose calibration activations would not fit as a
whole still quantizes, at the cost of one forward per block.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from leanlm.attention import SDPAMetadata
from leanlm.errors import LeanLMError


def calibration_tokens(texts: Iterable[str], tokenizer: object, n_samples: int = 128,
                       seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows [n, seq_len] of the tokenized, ``<eos>``-joined texts (seeded)."""
    if n_samples < 1 or seq_len < 1:
        raise LeanLMError(f"n_samples ({n_samples}) and seq_len ({seq_len}) must be positive")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        if eos is not None:
            stream.append(eos)
        stream.extend(tokenizer.encode(t, add_special_tokens=False))
    return sample_windows(torch.tensor(stream, dtype=torch.long), n_samples, seq_len, seed)


def sample_windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows [n, seq_len] of a token stream, at seeded random offsets."""
    if len(stream) < seq_len:
        raise LeanLMError(f"calibration data has {len(stream)} tokens, fewer than one window of "
                          f"seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(stream) - seq_len + 1) for _ in range(n_samples)]
    return torch.stack([stream[s:s + seq_len].long() for s in starts])


class LayerInputs:
    """The inputs of the current block for all calibration samples, in micro-batches."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> None:
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise LeanLMError(f"calibration tokens must be a [n, seq] integer tensor, got "
                              f"{tuple(tokens.shape)} {tokens.dtype}")
        if int(tokens.max()) >= model.config.vocab_size or int(tokens.min()) < 0:
            raise LeanLMError(f"calibration token ids must lie in [0, {model.config.vocab_size})")
        device = model.embed_tokens.weight.device
        self.batches: list[tuple[torch.Tensor, SDPAMetadata]] = []
        with torch.no_grad():
            for mb in tokens.to(device).split(batch_size):
                self.batches.append(model.embed(mb))

    @property
    def num_tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x, _ in self.batches)

    def run(self, fn: Callable[[torch.Tensor, SDPAMetadata], torch.Tensor]) -> Iterator[torch.Tensor]:
        with torch.no_grad():
            for x, meta in self.batches:
                yield fn(x, meta)

    def outputs(self, block: nn.Module) -> list[torch.Tensor]:
        return list(self.run(lambda x, meta: block(x, meta)))

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The next block's inputs are ``outputs`` (one tensor per micro-batch)."""
        self.batches = [(y, meta) for y, (_, meta) in zip(outputs, self.batches, strict=True)]


class _Enough(Exception):
    """Raised by the last hook of :func:`capture_inputs`: the rest of the forward is not needed."""


def capture_inputs(modules: dict[str, nn.Module], inputs: LayerInputs,
                   fn: Callable[[torch.Tensor, SDPAMetadata], torch.Tensor],
                   reduce: Callable[[str, torch.Tensor], None], stop_after: str | None = None) -> None:
    """Run ``fn`` over all micro-batches, calling ``reduce(name, x)`` with each input of each
    module in ``modules``; ``reduce`` decides what to keep. With ``stop_after``, each forward
    ends as soon as that module's input has been seen."""
    def hook(_m: nn.Module, args: tuple, name: str) -> None:
        reduce(name, args[0].detach())
        if name == stop_after:
            raise _Enough

    handles = [m.register_forward_pre_hook(lambda m_, a, n=name: hook(m_, a, n))
               for name, m in modules.items()]
    try:
        with torch.no_grad():
            for x, meta in inputs.batches:
                with contextlib.suppress(_Enough):
                    fn(x, meta)
    finally:
        for h in handles:
            h.remove()
