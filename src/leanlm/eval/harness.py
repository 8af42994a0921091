"""leanlm models inside EleutherAI's lm-evaluation-harness (the optional ``lm_eval`` extra).

Importing this module registers the model type ``leanlm``, so every harness task (wikitext,
piqa, arc, hellaswag, winogrande, lambada, or a local YAML task) runs on a leanlm checkpoint —
quantized ones included::

    import lm_eval, leanlm.eval.harness
    lm_eval.simple_evaluate(model="leanlm", model_args="pretrained=DIR,dtype=float32", tasks=["piqa"])

The three request types map onto leanlm's own scoring: ``loglikelihood`` is the multiple-choice
scorer of ``tasks.py`` (lm-eval's pair encoding, batched), ``loglikelihood_rolling`` scores a
whole document in lm-eval's disjoint rolling windows (every token predicted once, the first
after the end-of-text token), and ``generate_until`` is greedy ``generate_text`` with the
request's stop strings.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from leanlm.eval.tasks import encode_pair, loglikelihoods


@register_model("leanlm")
class LeanLMHarness(LM):
    def __init__(self, pretrained: str | None = None, dtype: str = "float32", batch_size: int | str = 8,
                 max_length: int | None = None, model: Any = None, tokenizer: Any = None) -> None:
        """A checkpoint directory (``pretrained``; default: leanlm's embedded model), or an
        already loaded ``model`` and ``tokenizer``."""
        super().__init__()
        from leanlm.checkpoint import load_model
        from leanlm.cliutil import resolve_model
        from leanlm.tokenizer import load_tokenizer

        if model is None:
            from pathlib import Path

            path = resolve_model(Path(pretrained) if pretrained else None)
            model, tokenizer = load_model(path, dtype=dtype, pack=True), load_tokenizer(path)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            pairs.append((ctx or [self.eot], cont))
        return loglikelihoods(self.model, pairs, self.max_length, self.batch_size)

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        out = []
        for (text,) in (r.args for r in requests):
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, prefix_token=self.eot, max_seq_len=self.max_length, context_len=1)]
            scored = loglikelihoods(self.model, windows, self.max_length, self.batch_size)
            out.append(sum(ll for ll, _ in scored))
        return out

    def generate_until(self, requests: list) -> list[str]:
        from leanlm.generate import generate_text
        from leanlm.sampling import SamplingParams

        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            sampled = kwargs.get("do_sample") and float(kwargs.get("temperature", 0.0)) > 0
            cfg = SamplingParams(max_tokens=int(kwargs.get("max_gen_toks", 256)),
                                 temperature=float(kwargs["temperature"]) if sampled else 0.0,
                                 stop=[until] if isinstance(until, str) else list(until))
            out.append(generate_text(self.model, self.tokenizer, context, cfg))
        return out
