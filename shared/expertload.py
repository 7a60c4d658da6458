"""Skewed, drifting expert loads: the sim engine's expert statistics and the simulator's MoE model.

Real MoE routers send most tokens to a few experts per layer, and which
experts are hot shifts with the workload. Each layer here ranks its experts
by a Zipf law (exponent `skew`); every `drift_every_s` seconds two experts of
each layer swap popularity ranks, so the load drifts slowly. A step's routed
tokens (tokens x top_k) are split among experts by those weights.
"""

from __future__ import annotations

import numpy as np


class ExpertLoadModel:
    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        skew: float = 1.0,
        drift_every_s: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.drift_every_s = drift_every_s
        self._rng = np.random.default_rng(seed)
        ranks = np.arange(1, num_experts + 1, dtype=np.float64)
        self._zipf = ranks**-skew / np.sum(ranks**-skew)
        self._order = np.stack([self._rng.permutation(num_experts) for _ in range(num_layers)])
        self._last_drift: float | None = None
        self._weights: np.ndarray | None = None  # cached until the next drift

    def weights(self) -> np.ndarray:
        """[layers, experts] routing probabilities now."""
        if self._weights is None:
            out = np.empty((self.num_layers, self.num_experts))
            for layer in range(self.num_layers):
                out[layer, self._order[layer]] = self._zipf
            self._weights = out
        return self._weights

    def weights_at(self, now: float) -> np.ndarray:
        """[layers, experts] routing probabilities at time `now` (drifting up to it first)."""
        self._drift(now)
        return self.weights()

    def _drift(self, now: float) -> None:
        if self._last_drift is None:
            self._last_drift = now
        while now - self._last_drift >= self.drift_every_s:
            self._last_drift += self.drift_every_s
            for layer in range(self.num_layers):
                a, b = self._rng.choice(self.num_experts, size=2, replace=False)
                self._order[layer, [a, b]] = self._order[layer, [b, a]]
            self._weights = None

    def step_counts(self, tokens: int, now: float) -> np.ndarray:
        """Routed tokens per [layer, expert] for a step of `tokens` tokens."""
        # One draw for every layer (multinomial broadcasts over the rows of `pvals`).
        return self._rng.multinomial(tokens * self.top_k, self.weights_at(now)).astype(np.int64)
