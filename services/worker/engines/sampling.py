"""Choosing the next token from logits: logit shaping, a grammar's mask, then greedy, temperature,
top-k, top-p; and the log-probabilities a request asked for, taken from the model's logits before
any of that.

Shaping (OpenAI's `logit_bias`, presence and frequency penalties, the
repetition penalty of `transformers` and a floor on the output's length)
depends only on the request's own tokens, so it changes nothing about the
reproducibility below.

Sampling is reproducible per position: the token at position p of a request
with seed s is drawn from a generator seeded by mix(s, p). It therefore does
not depend on the batch, on preemption, or on which worker produces it (a
resumed request continues exactly as it would have).
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq

import torch

from services.worker.engines.base import Sampling, TokenLogprob
from services.worker.engines.scheduler import Sequence
from services.worker.engines.seeds import position_seed


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: Seq[Sequence], eos_token_ids: Collection[int]) -> list[int]:
    """The next token of each sequence, from its row of `logits` [rows, vocab] (float32, shaped in place)."""
    for row, seq in enumerate(seqs):
        if seq.request.sampling.shapes_logits:
            shape_logits(logits[row], seq.request.sampling, seq.tokens, seq.num_prompt, eos_token_ids)
        if seq.constraint is not None:
            _keep_only(logits[row], seq.constraint.allowed)
    out = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        sampling = seq.request.sampling
        if not sampling.greedy:
            out[row] = _draw(logits[row], sampling, len(seq.tokens))
    return [int(token) for token in out]


def _keep_only(logits: torch.Tensor, allowed: list[int]) -> None:
    """Mask every token but `allowed` (a grammar's next tokens) in one row of logits, in place.

    The grammar outranks shaping: where shaping excluded every allowed token (`min_tokens` against
    a stop token the grammar wants), the allowed ones stay, equally likely, rather than none.
    """
    keep = torch.tensor(allowed, dtype=torch.long, device=logits.device)
    kept = logits[keep]
    if not bool(torch.isfinite(kept).any()):
        kept = torch.zeros_like(kept)
    logits.fill_(float("-inf"))
    logits[keep] = kept


def shape_logits(
    logits: torch.Tensor, sampling: Sampling, tokens: Seq[int], num_prompt: int, eos_token_ids: Collection[int]
) -> None:
    """Apply the request's bias, length floor and penalties to one row of logits [vocab], in place.

    `tokens` is the prompt followed by the output so far (`num_prompt` of them
    are the prompt). Presence and frequency penalties count the output only,
    as OpenAI defines them; the repetition penalty covers the prompt too, as
    `transformers` and vLLM apply it.
    """
    device = logits.device
    if sampling.logit_bias:
        ids, biases = zip(*sampling.logit_bias, strict=True)
        logits.index_add_(0, torch.tensor(ids, device=device), torch.tensor(biases, dtype=logits.dtype, device=device))
    if len(tokens) - num_prompt < sampling.min_tokens:
        ending = [*sampling.stop_token_ids, *(() if sampling.ignore_eos else eos_token_ids)]
        logits[torch.tensor(ending, dtype=torch.long, device=device)] = float("-inf")
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(tokens)), dtype=torch.long, device=device)
        picked = logits[seen]
        penalty = sampling.repetition_penalty
        logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    if (sampling.presence_penalty or sampling.frequency_penalty) and len(tokens) > num_prompt:
        counts = torch.bincount(torch.tensor(tokens[num_prompt:], device=device), minlength=logits.shape[0])
        logits -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)


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


def model_logprobs(logits: torch.Tensor, seqs: Seq[Sequence]) -> dict[int, torch.Tensor]:
    """Log-softmax of the rows whose request asked for logprobs, by row: the model's own distribution,
    taken before `sample` shapes the logits in place (as vLLM's and OpenAI's logprobs are)."""
    rows = [row for row, seq in enumerate(seqs) if seq.request.sampling.logprobs is not None]
    if not rows:
        return {}
    logprobs = torch.log_softmax(logits[rows], dim=-1)
    return {row: logprobs[i] for i, row in enumerate(rows)}


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's entry from its row's log-probabilities [vocab], with the `top` most likely."""
    best = torch.topk(logprobs, top) if top else None
    alternatives = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), alternatives)
