"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Sampling is reproducible per position: the token at position p of a request
with seed s is drawn from a generator seeded by mix(s, p). It therefore does
not depend on the batch, on preemption, or on which worker produces it (a
resumed request continues exactly as it would have).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.worker.engines.base import Sampling
from services.worker.engines.seeds import position_seed


def sample(logits: torch.Tensor, params: Sequence[Sampling], positions: Sequence[int]) -> list[int]:
    """One token per row of `logits` [rows, vocab] (float32)."""
    out = logits.argmax(dim=-1).tolist()
    for row, (sampling, position) in enumerate(zip(params, positions, strict=True)):
        if not sampling.greedy:
            out[row] = _draw(logits[row], sampling, position)
    return [int(token) for token in out]


def _draw(logits: torch.Tensor, sampling: Sampling, position: int) -> int:
    scaled = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        drop = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    generator = torch.Generator(device="cpu").manual_seed(position_seed(sampling.seed or 0, position))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
