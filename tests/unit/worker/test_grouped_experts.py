"""The grouped MoE layer against the per-expert loop it replaces for a process holding every expert."""

from __future__ import annotations

import pytest
import torch

from services.worker.engines.reference.model import ExpertWeights, run_grouped_experts, stack_experts

pytestmark = pytest.mark.unit


def run_local_experts(  # the per-expert loop the batched layer replaced: the reference
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    experts: dict[int, ExpertWeights],
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each held expert on its routed tokens, one small matmul each, summed per token in expert order."""
    top_k = ids.shape[1]
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=num_experts)
    order = torch.argsort(flat, stable=True)
    token_of = order // top_k
    weight_of = weights.flatten()[order]
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        end = start + count
        held = experts.get(expert)
        if held is not None:
            rows = token_of[start:end]
            y = held(x[rows]) * weight_of[start:end, None]
            out.index_add_(0, rows, y)
        start = end
    return out, counts


@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
def test_grouped_experts_equal_the_per_expert_loop(tokens: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    experts_n, hidden, inner = 8, 64, 96
    experts = {
        e: ExpertWeights(
            torch.randn(2 * inner, hidden, generator=generator), torch.randn(hidden, inner, generator=generator)
        )
        for e in range(experts_n)
    }
    loop_experts = dict(experts)
    grouped = stack_experts(experts)
    x = torch.randn(tokens, hidden, generator=generator)
    # Skewed routing, the last expert never chosen: uneven rows per expert and an empty one.
    ids = torch.stack(
        [
            torch.randint(0, 2, (tokens,), generator=generator),
            torch.randint(2, experts_n - 1, (tokens,), generator=generator),
        ],
        dim=1,
    )
    weights = torch.rand(tokens, 2, generator=generator)
    expected, expected_counts = run_local_experts(x, ids, weights, loop_experts, experts_n)
    got, counts = run_grouped_experts(x, ids, weights, grouped)
    assert torch.equal(counts, expected_counts) and counts[-1] == 0
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)
    # The per-expert views are the stack's storage, not a second copy.
    assert experts[3].w13.data_ptr() == grouped.w13[3].data_ptr()
