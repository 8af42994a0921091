"""leanlm models inside EleutherAI's lm-evaluation-harness (the optional ``lm_eval`` extra).

Importing this module registers the model type ``leanlm``, so every harness task (wikitext,
piqa, arc, hellaswag, winogrande, lambada, or a local YAML task) runs on a leanlm checkpoint —
quantized ones included::

    import lm_eval, leanlm.eval.harness
    lm_eval.simple_evaluate(model="leanlm", model_args="pretrained=DIR,dtype=float32", tasks=["piqa"])

The three request types map onto leanlm's own scoring, encoded as lm-eval's ``hf`` model encodes
them (BOS where the tokenizer's config adds it, ``add_bos_token=`` to say otherwise; an empty
context scored after BOS, else EOS): ``loglikelihood`` is the multiple-choice scorer of
``tasks.py`` (lm-eval's pair encoding, batched), ``loglikelihood_rolling`` scores a whole
document in lm-eval's disjoint rolling windows (every token predicted once, the first after the
prefix token), and ``generate_until`` is greedy ``generate_text`` with the request's stop strings.

lm-eval's own command line finds only the model types it ships (it has no plugin hook), so
``leanlm lm-eval ARGS`` runs it with this one registered: ``leanlm lm-eval --model leanlm
--model_args pretrained=DIR --tasks piqa`` takes every option of ``lm_eval``.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from leanlm.eval.tasks import encode_pair, loglikelihoods


@register_model("leanlm")
class LeanLMHarness(LM):
    def __init__(self, pretrained: str | None = None, dtype: str = "auto", batch_size: int | str = 8,
                 max_length: int | None = None, device: str | None = None, max_batch_size: int | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 model: Any = None, tokenizer: Any = None) -> None:
        """A checkpoint directory (``pretrained``; default: leanlm's embedded model), or an
        already loaded ``model`` and ``tokenizer``. The other arguments are those of lm-eval's
        ``hf`` model, with its meanings: ``dtype`` (``auto``: the checkpoint's), ``batch_size``
        (``auto``/``auto:N``: leanlm's default of 8), ``device`` (``cpu`` or ``cuda[:i]``),
        ``add_bos_token`` (``None``: what the tokenizer's config says, as ``leanlm generate``),
        ``prefix_token_id`` (the context of an empty context: BOS, else EOS)."""
        super().__init__()
        from leanlm.checkpoint import load_model
        from leanlm.cliutil import resolve_model
        from leanlm.tokenizer import load_tokenizer

        if model is None:
            from pathlib import Path

            path = resolve_model(Path(pretrained) if pretrained else None)
            model = load_model(path, dtype=None if dtype in (None, "auto") else dtype,
                               device=device or "cpu", pack=True)
            tokenizer = load_tokenizer(path)
        self.model, self.tokenizer = model.eval(), tokenizer
        auto = isinstance(batch_size, str) and batch_size.startswith("auto")
        self.batch_size = 8 if auto else int(batch_size)
        del max_batch_size  # (lm-eval's search for a batch size that fits; leanlm batches by 8)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.add_bos_token = add_bos_token
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix = (prefix_token_id if prefix_token_id is not None
                       else bos if bos is not None else (eos or 0))

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """lm-eval's ``hf`` ``tok_encode``: the tokenizer's own special tokens unless told."""
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            if context:
                pairs.append(encode_pair(self.tokenizer, context, continuation, self.tok_encode))
                continue
            cont = self.tok_encode(continuation, add_special_tokens=False)  # lm-eval: BOS/EOS as context
            pairs.append(([self.prefix], cont) if cont[:1] != [self.prefix] else (cont[:1], cont[1:]))
        return loglikelihoods(self.model, pairs, self.max_length, self.batch_size)

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        out = []
        for (text,) in (r.args for r in requests):
            tokens = self.tok_encode(text)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, prefix_token=self.prefix, max_seq_len=self.max_length, context_len=1)]
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
