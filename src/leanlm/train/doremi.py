"""DoReMi: domain weights from a small proxy model trained with Group DRO (Xie et al. 2023,
"DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining", Algorithm 1).

1. A *reference* model is trained on the baseline domain weights α_ref (uniform by default).
2. A *proxy* model of the same size is trained on batches sampled with α_ref, minimising the
   worst-case excess loss over domains. At step t, with per-token losses ℓ_θ of the proxy and
   ℓ_ref of the reference, for every domain i

       λ_t[i] = Σ_{x∈B_i} Σ_j max(ℓ_θ(x_j) − ℓ_ref(x_j), 0) / Σ_{x∈B_i} |x|     (excess loss)
       α'_t   = α_{t−1} ⊙ exp(η λ_t)                                             (exponentiated gradient)
       α_t    = (1 − c) α'_t / Σ_i α'_t[i] + c u                                 (smoothing, u uniform)

   and the proxy takes an optimizer step on Σ_i α_t[i] λ_t[i] (the clipped excess losses,
   differentiated through ℓ_θ). Defaults: η = 1, c = 10⁻³.
3. The result is the average ᾱ = (1/T) Σ_t α_t, written to ``OUT/weights.json``; a model is then
   trained on it with ``leanlm pretrain --set domain_weights=OUT/weights.json`` (the trainer's
   :class:`~leanlm.data.tokens.MixtureLoader` samples each sequence's domain by the weights).

Iterated DoReMi (the paper's §3, used for its GLaM runs): with ``rounds`` > 1 the steps repeat,
round r + 1's reference weights α_ref being round r's ᾱ, until ``rounds`` or until no weight moves
by more than ``tolerance`` (each round in ``OUT/roundN``).

Both models are trained by leanlm's :class:`~leanlm.train.trainer.Trainer` (the proxy by a
subclass that replaces the training step), so they checkpoint, resume and log as pretraining does;
that is why DoReMi lives with the trainer, above the data layer whose mixture sampler it drives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leanlm.attention import SDPAMetadata
from leanlm.checkpoint import load_model
from leanlm.data.corpus import load_manifest
from leanlm.data.tokens import MixtureLoader, make_batch
from leanlm.errors import LeanLMError
from leanlm.fsutil import write_json
from leanlm.train.config import TrainConfig
from leanlm.train.trainer import Trainer, lr_at


@dataclass
class DoReMiConfig:
    eta: float = 1.0  # step size of the exponentiated-gradient update
    smoothing: float = 1e-3  # c: mixed with the uniform distribution after each update
    reference_weights: dict[str, float] | None = None  # α_ref; None: uniform
    rounds: int = 1  # iterated DoReMi: each round's reference is trained on the last round's weights
    tolerance: float = 1e-3  # ... stopping early once no weight moves by more than this

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise LeanLMError(f"DoReMi needs rounds >= 1, got {self.rounds}")


class ProxyTrainer(Trainer):
    """The Group DRO proxy of DoReMi: the trainer with its step replaced (one process)."""

    def __init__(self, cfg: TrainConfig, reference: Path, doremi: DoReMiConfig, quiet: bool = False) -> None:
        self.doremi = doremi
        self._resumed: dict[str, Any] | None = None
        super().__init__(cfg, quiet)
        if self.d.world != 1 or cfg.grad_accum != 1 or not isinstance(self.loader, MixtureLoader):
            raise LeanLMError("the DoReMi proxy trains in one process with grad_accum=1 and domain weights")
        self.reference = load_model(reference).to(self.d.device).eval().requires_grad_(False)
        k = len(self.loader.domains)
        self.alpha = np.full(k, 1.0 / k)
        self.alpha_sum = np.zeros(k)
        if self._resumed is not None:
            self.alpha = np.array(self._resumed["alpha"])
            self.alpha_sum = np.array(self._resumed["alpha_sum"])

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(),
                "doremi": {"alpha": self.alpha.tolist(), "alpha_sum": self.alpha_sum.tolist()}}

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        self._resumed = state.get("doremi")

    def _token_losses(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        with self._autocast():
            attn = SDPAMetadata.packed(batch.documents, model.sliding_window)
            logits = model(batch.inputs, batch.positions, attn)
        return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                               reduction="none").view(batch.targets.shape)

    def train_step(self) -> tuple[float, float]:
        cfg, c, k = self.cfg, self.doremi.smoothing, len(self.alpha)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        windows, dom = self.loader.draw()  # type: ignore[union-attr]
        batch = make_batch(windows, self.eos_id, cfg.document_masking).to(self.d.device)
        losses = self._token_losses(self.model, batch)
        with torch.no_grad():
            ref = self._token_losses(self.reference, batch)
        excess = (losses - ref).clamp(min=0).sum(dim=1)  # per sequence
        domain = torch.as_tensor(dom, device=excess.device)
        per_domain = torch.zeros(k, device=excess.device).index_add(0, domain, excess)
        tokens = torch.bincount(domain, minlength=k).float() * losses.shape[1]
        lam = (per_domain / tokens.clamp(min=1)).detach().cpu().double().numpy()
        alpha = self.alpha * np.exp(self.doremi.eta * lam)
        self.alpha = (1 - c) * alpha / alpha.sum() + c / k
        self.alpha_sum += self.alpha
        weights = torch.as_tensor(self.alpha, dtype=torch.float32, device=excess.device)
        objective = (weights * per_domain / tokens.clamp(min=1)).sum()
        objective.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(losses.detach().mean()), float(norm)

    def domain_weights(self) -> dict[str, float]:
        """ᾱ: the average of α_t over the steps trained."""
        avg = self.alpha_sum / max(1, self.step)
        return dict(zip(self.loader.domains, (avg / avg.sum()).tolist(), strict=True))  # type: ignore[union-attr]


def doremi(corpus: str | Path, out: str | Path, base: TrainConfig, config: DoReMiConfig | None = None,
           quiet: bool = False) -> dict[str, Any]:
    """Train the reference and the proxy on ``corpus`` with ``base``'s model and schedule (once per
    round); writes and returns ``OUT/weights.json``."""
    config = config or DoReMiConfig()
    out = Path(out)
    domains = list(load_manifest(corpus)["domains"])
    ref_weights = config.reference_weights or {d: 1.0 / len(domains) for d in domains}
    history: list[dict[str, float]] = []
    for r in range(config.rounds):
        where = out if config.rounds == 1 else out / f"round{r + 1}"
        weights, steps = _round(corpus, where, base, ref_weights if r == 0 else history[-1], config, quiet)
        history.append(weights)
        if r and max(abs(weights[d] - history[-2][d]) for d in domains) <= config.tolerance:
            break
    result = {"domain_weights": history[-1], "reference_weights": ref_weights, "steps": steps,
              "eta": config.eta, "smoothing": config.smoothing}
    if config.rounds > 1:
        result["rounds"] = history
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "weights.json", result)
    return result


def _round(corpus: str | Path, out: Path, base: TrainConfig, ref_weights: dict[str, float],
           config: DoReMiConfig, quiet: bool) -> tuple[dict[str, float], int]:
    """One reference + proxy: (ᾱ, proxy steps)."""
    cfg = dataclasses.replace(base, data=str(corpus), domain_weights=ref_weights, grad_accum=1)
    reference = Trainer(dataclasses.replace(cfg, out=str(out / "reference")), quiet)
    try:
        reference.run()
    finally:
        reference.close()
    proxy = ProxyTrainer(dataclasses.replace(cfg, out=str(out / "proxy")), out / "reference" / "model",
                         config, quiet)
    try:
        proxy.run()
        return proxy.domain_weights(), proxy.step
    finally:
        proxy.close()
