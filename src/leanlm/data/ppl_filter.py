"""Model-perplexity filtering: score every document with a leanlm model, keep a percentile band.

CCNet (Wenzek et al. 2020) keeps the documents a language model trained on a clean reference finds
likely; the survey lists such model-based filtering among its data-selection methods. Each
document is scored as the model was trained (``<eos> text``, the first ``max_tokens`` tokens):
``ppl = exp(-(1/N) Σ_t log p(x_{t+1} | x_{≤t}))``. Scores are computed per input file in parallel
(each worker loads the model once) and kept under ``OUT/.work``; the band ``[low, high]`` of
percentiles over all documents is decided once, and the pipeline writes the documents inside it.
Lower perplexity = closer to the model's training data: ``high=70`` drops the 30% least likely
(noise, boilerplate in other languages, random strings), ``low`` > 0 drops near-duplicated
templates the model has memorised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanlm.data.io import ReadConfig, ReadErrors, list_inputs, read_documents
from leanlm.data.pipeline import Executor, ListedIndices, LocalExecutor, Pipeline, claim_output
from leanlm.errors import LeanLMError
from leanlm.fsutil import write_json


@dataclass
class PerplexityConfig:
    model: str | None = None  # a model directory; None: the embedded default model
    low: float = 0.0  # keep documents whose perplexity percentile is in [low, high]
    high: float = 90.0
    max_tokens: int = 512
    threads: int = 1  # torch threads per worker

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high <= 100:
            raise LeanLMError(f"percentile band [{self.low}, {self.high}]: expected 0 <= low < high <= 100")


_MODELS: dict[str, tuple[Any, Any]] = {}  # one loaded model per worker process


def _model(path: str | None) -> tuple[Any, Any]:
    from leanlm.assets import default_model_path
    from leanlm.checkpoint import load_model
    from leanlm.tokenizer import load_tokenizer

    key = path or str(default_model_path())
    if key not in _MODELS:
        _MODELS[key] = (load_model(key).eval(), load_tokenizer(key))
    return _MODELS[key]


@torch.inference_mode()
def perplexity(text: str, model: Any, tok: Any, max_tokens: int) -> float:
    """Perplexity of ``<eos> text`` (truncated to ``max_tokens``) under ``model``."""
    ids = [tok.eos_token_id, *tok.encode(text, add_special_tokens=False)][:max_tokens]
    if len(ids) < 2:
        return math.inf  # nothing to predict: sorts with the least likely
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model(tokens[:, :-1]).float()
    nll = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:])
    return float(torch.exp(nll))


@dataclass
class _Scores:
    config: PerplexityConfig
    read: ReadConfig

    def __call__(self, task: tuple[Path, Path | None]) -> np.ndarray:
        path, root = task
        torch.set_num_threads(self.config.threads)
        model, tok = _model(self.config.model)
        return np.array([perplexity(d[self.read.text_field], model, tok, self.config.max_tokens)
                         for d in read_documents(path, self.read, ReadErrors(), root)], dtype=np.float64)


def band(scores: list[np.ndarray], low: float, high: float) -> list[np.ndarray]:
    """Per file, the indices of documents whose score lies within the [low, high] percentiles."""
    allv = np.concatenate(scores) if scores else np.zeros(0)
    finite = allv[np.isfinite(allv)]
    if len(finite) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in scores]
    lo, hi = np.percentile(finite, [low, high])
    return [np.flatnonzero((s >= lo) & (s <= hi)) for s in scores]


def ppl_filter(inputs: str | Path, out: str | Path, config: PerplexityConfig | None = None,
               read: ReadConfig | None = None, executor: Executor | None = None,
               compression: str = "gzip") -> dict[str, Any]:
    """Keep the documents of ``inputs`` inside the perplexity percentile band; returns stats."""
    config, read = config or PerplexityConfig(), read or ReadConfig()
    executor = executor or LocalExecutor()
    files = list_inputs(inputs)
    root = Path(inputs) if Path(inputs).is_dir() else None
    work = Path(out) / ".work"
    claim_output(work, {"ppl_filter": asdict(config), "read": asdict(read),
                        "inputs": [str(f) for f in files]})
    kept_dir = work / "kept"
    if not (work / "scores.json").exists():
        scores = executor.map(_Scores(config, read), [(f, root) for f in files], desc="perplexity")
        kept_dir.mkdir(parents=True, exist_ok=True)
        for t, (s, k) in enumerate(zip(scores, band(scores, config.low, config.high), strict=True)):
            np.save(work / f"scores-{t:05d}.npy", s)
            np.save(kept_dir / f"{t:05d}.npy", k)
        finite = np.concatenate(scores)
        finite = finite[np.isfinite(finite)]
        write_json(work / "scores.json", {
            "documents": int(sum(len(s) for s in scores)),
            "percentiles": {str(p): float(np.percentile(finite, p)) for p in (0, 10, 50, 90, 100)}
            if len(finite) else {}})
    listed = ListedIndices(str(kept_dir.resolve()), keep=True, rule="perplexity:outside_band",
                           name="perplexity")
    return Pipeline([listed], read, compression).run(inputs, out, executor)
