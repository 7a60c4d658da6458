"""What a simulation measured: latency percentiles, SLO attainment, goodput, cost; a table and a plot.

A request meets the SLO when it was served, its TTFT is within the TTFT SLO
and its mean time between tokens within the TBT SLO (those of the pool that
decoded it, unless overridden). Goodput counts such requests per second of
the simulated span (first arrival to last finish).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.cluster import SimResult


@dataclass(frozen=True)
class Metrics:
    requests: int
    served: int
    refused: int
    span_s: float
    ttft_s: tuple[float, float, float]  # p50, p90, p99
    tbt_s: tuple[float, float, float]
    slo_attainment: float
    goodput_rps: float
    output_tokens_per_s: float
    worker_seconds: float
    cost: float
    prefix_hit_rate: float | None  # None: no request carries block hashes (nothing to cache by)
    scaling_events: int
    replicas_mean: float
    wall_s: float
    # MoE pools only: time-mean balance (max / mean rank load) and expert copies moved.
    expert_balance: float | None = None
    expert_moves: int = 0

    @property
    def sim_requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    def rows(self) -> list[tuple[str, str]]:
        def ms(values: tuple[float, float, float]) -> str:
            return " / ".join(f"{v * 1000:.0f}" for v in values)

        return [
            ("requests (served / refused)", f"{self.requests} ({self.served} / {self.refused})"),
            ("simulated span", f"{self.span_s:.1f} s"),
            ("TTFT p50 / p90 / p99", f"{ms(self.ttft_s)} ms"),
            ("TBT p50 / p90 / p99 (per-request mean)", f"{ms(self.tbt_s)} ms"),
            ("SLO attainment", f"{self.slo_attainment:.3f}"),
            ("goodput", f"{self.goodput_rps:.2f} req/s"),
            ("output tokens", f"{self.output_tokens_per_s:.0f} tok/s"),
            ("worker-seconds / mean replicas", f"{self.worker_seconds:.0f} / {self.replicas_mean:.2f}"),
            ("cost", f"{self.cost:.3f}"),
            (
                "prefix-cache hit rate (tokens)",
                "n/a (no block hashes)" if self.prefix_hit_rate is None else f"{self.prefix_hit_rate:.3f}",
            ),
            ("scaling events", str(self.scaling_events)),
            (
                "expert balance / copies moved",
                "-" if self.expert_balance is None else f"{self.expert_balance:.3f} / {self.expert_moves}",
            ),
            ("simulation wall time", f"{self.wall_s:.2f} s ({self.sim_requests_per_s:.0f} req/s)"),
        ]


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (0.0, 0.0, 0.0)
    p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
    return (float(p50), float(p90), float(p99))


def measure(result: SimResult, ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> Metrics:
    jobs = [j for j in result.jobs if j.arrived >= result.measured_from]  # the warm-up's requests are not judged
    served = [j for j in jobs if not j.refused and j.finished_at is not None]
    ttfts = [j.ttft for j in served if j.ttft is not None]
    tbts = [j.tbt for j in served if j.tbt is not None and j.request.output_tokens > 1]
    met = 0
    for job in served:
        slo = result.pools[result.worker_pools[job.worker]].spec.slo
        ttft_limit = ttft_slo_s if ttft_slo_s is not None else slo.ttft_p90_s
        tbt_limit = tbt_slo_s if tbt_slo_s is not None else slo.tbt_p90_s
        if (job.ttft or 0.0) <= ttft_limit and (job.tbt or 0.0) <= tbt_limit:
            met += 1
    start = result.measured_from if result.measured_from > 0 else min((j.arrived for j in jobs), default=0.0)
    span = max(result.end_s - start, 1e-9)
    prompt = sum(j.request.prompt_tokens for j in served)
    cost = sum(seconds / 3600 * result.pools[pool].cost_per_hour for pool, seconds in result.worker_seconds.items())
    worker_seconds = sum(result.worker_seconds.values())
    moe = [p.experts for p in result.pools.values() if p.experts is not None]
    return Metrics(
        requests=len(jobs),
        served=len(served),
        refused=sum(1 for j in jobs if j.refused),
        span_s=span,
        ttft_s=_percentiles(ttfts),
        tbt_s=_percentiles(tbts),
        slo_attainment=met / len(jobs) if jobs else 0.0,
        goodput_rps=met / span,
        output_tokens_per_s=sum(j.request.output_tokens for j in served) / span,
        worker_seconds=worker_seconds,
        cost=cost,
        prefix_hit_rate=(
            sum(j.cached_tokens for j in served) / prompt if any(j.request.hashes for j in served) and prompt else None
        ),
        scaling_events=len(result.scaling_events),
        replicas_mean=worker_seconds / span,
        wall_s=result.wall_s,
        expert_balance=float(np.mean([e.mean_balance for e in moe])) if moe else None,
        expert_moves=sum(e.moves for e in moe),
    )


def table(columns: dict[str, Metrics]) -> str:
    """Metrics side by side, one column per run."""
    names = list(columns)
    labels = [label for label, _ in next(iter(columns.values())).rows()]
    cells = [[value for _, value in m.rows()] for m in columns.values()]
    widths = [max(len(label) for label in labels)] + [
        max(len(name), *(len(c) for c in col)) for name, col in zip(names, cells, strict=True)
    ]
    lines = ["  ".join(text.ljust(w) for text, w in zip(["", *names], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row, label in enumerate(labels):
        lines.append("  ".join(t.ljust(w) for t, w in zip([label, *(c[row] for c in cells)], widths, strict=True)))
    return "\n".join(lines)


# A pool at its replica cap for this share of the run or more gets a warning: what it would have scaled to
# is unknown, so its figures understate what the policy would do.
CAP_WARNING_SHARE = 0.1


def cap_warnings(result: SimResult) -> list[str]:
    """The scaled pools that sat at max_replicas for a tenth of the run or more."""
    rows = [row for row in result.timeline if row.t >= result.measured_from]
    warnings = []
    for name, pool in result.pools.items():
        cap = pool.spec.max_replicas
        if pool.spec.scaling.policy == "fixed" or not rows:
            continue
        share = sum(row.replicas.get(name, 0) >= cap for row in rows) / len(rows)
        if share >= CAP_WARNING_SHARE:
            warnings.append(
                f"pool {name} sat at its replica cap ({cap}) for {share:.0%} of the run: it may have needed more "
                "(raise max_replicas in the cluster file to see how many)"
            )
    return warnings


# The arrivals panel shows at most this many bins: per-tick counts of a bursty trace are an unreadable band.
ARRIVAL_BINS = 150


def _binned(t: list[float], rates: list[float]) -> tuple[list[float], list[float]]:
    """Arrival rates averaged over consecutive ticks, at most ARRIVAL_BINS of them."""
    width = max(1, -(-len(t) // ARRIVAL_BINS))
    starts = list(range(0, len(t), width))
    return [t[i] for i in starts], [float(np.mean(rates[i : i + width])) for i in starts]


def plot(results: dict[str, SimResult], path: Path) -> Path:
    """A PNG of load, replicas and latency over time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (load, replicas, latency) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for name, result in results.items():
        t = [row.t for row in result.timeline]
        load.step(*_binned(t, [row.arrivals_per_s for row in result.timeline]), where="post", label=name)
        replicas.step(t, [sum(row.replicas.values()) for row in result.timeline], where="post", label=name)
        latency.plot(t, [row.ttft_p90_s for row in result.timeline], label=f"{name} TTFT p90")
    load.set_ylabel("arrivals / s")
    replicas.set_ylabel("replicas")
    latency.set_ylabel("seconds")
    latency.set_xlabel("simulated seconds")
    for axis in (load, replicas, latency):
        axis.legend(loc="upper right", fontsize="small")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
