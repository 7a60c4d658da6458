"""The performance model of an engine step, per hardware profile.

One step of a continuously batched engine costs, in seconds,

    step = overhead
         + prefill_token_s * P + prefill_attn_s * sum(prefill context)
         + decode_seq_s * D + decode_ctx_s * sum(decode context)

where P is the number of prompt tokens computed in the step and D the
number of requests decoding one token. The terms are the fixed cost of a step
(weights streamed once, launch overheads), the per-token cost of prefill
(compute-bound), the attention cost of a prompt chunk against its context,
and the per-request and per-context-token cost of decoding (KV reads).

The `sim` engine sleeps for this time, so it is calibrated by the same
numbers. The `cpu-reference` profile is fitted to the reference engine
serving the tiny model on a 2-core CPU: `make calibrate-sim` times every step
under mixed prefill and decode work and fits the five terms by non-negative
least squares (median step error 17% on the development VM, whose step times
themselves jitter by about that much). It was fitted before the engine's
grouped experts and decode rows, and is kept as it was: the autoscaling
benchmarks size their workloads and declared capacities to it. The engine now
fits about twice as fast per decoding request (decode_seq_s 2.3e-4, decode_ctx_s
5e-7, overhead_s 0.006, prefill_token_s 9e-5). The GPU profiles are rough roofline
estimates for a Mixtral-8x7B-class model (47B weights, 13B active, fp16) at
tensor parallelism 2, not measurements: use them for relative comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PerfProfile:
    name: str
    overhead_s: float
    prefill_token_s: float
    prefill_attn_s: float
    decode_seq_s: float
    decode_ctx_s: float
    # KV-cache bytes per token and the bytes a worker can give the cache.
    kv_bytes_per_token: int
    kv_capacity_bytes: int
    # Seconds from process start to serving (weights load, warm-up).
    cold_start_s: float
    # Inter-worker KV transfer bandwidth (bytes/s) for P/D hand-offs.
    kv_transfer_bytes_per_s: float
    cost_per_hour: float

    def step_time(self, prefill_tokens: int, prefill_context: int, decode_seqs: int, decode_context: int) -> float:
        """Seconds one step takes (see module doc). Zero work costs nothing."""
        if prefill_tokens == 0 and decode_seqs == 0:
            return 0.0
        return (
            self.overhead_s
            + self.prefill_token_s * prefill_tokens
            + self.prefill_attn_s * prefill_context
            + self.decode_seq_s * decode_seqs
            + self.decode_ctx_s * decode_context
        )

    def prefill_time(self, tokens: int, cached: int = 0) -> float:
        """Seconds to prefill `tokens` new tokens after `cached` ones, alone."""
        context = tokens * cached + tokens * (tokens + 1) // 2
        return self.step_time(tokens, context, 0, 0)

    def sped_up(self, factor: float) -> PerfProfile:
        """The profile of steps `factor` times faster (the sim engine's speed-up)."""
        if factor == 1:
            return self
        return replace(
            self,
            overhead_s=self.overhead_s / factor,
            prefill_token_s=self.prefill_token_s / factor,
            prefill_attn_s=self.prefill_attn_s / factor,
            decode_seq_s=self.decode_seq_s / factor,
            decode_ctx_s=self.decode_ctx_s / factor,
        )

    def decode_throughput(self, context: float, tbt_s: float) -> float:
        """Tokens per second one replica decodes at `context` tokens a request, with the largest batch whose
        step stays within `tbt_s` and whose KV fits (one request at a time if even that is slower)."""
        most = max(1, int(self.kv_capacity_tokens // max(1.0, context)))
        low, high = 1, most
        while low < high:  # the step grows with the batch
            middle = (low + high + 1) // 2
            if self.step_time(0, 0, middle, int(middle * context)) <= tbt_s:
                low = middle
            else:
                high = middle - 1
        return low / self.step_time(0, 0, low, int(low * context))

    def kv_transfer_time(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.kv_transfer_bytes_per_s

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_capacity_bytes // self.kv_bytes_per_token


PROFILES: dict[str, PerfProfile] = {
    # Fitted to the reference engine serving the tiny model on 2 CPU cores (make calibrate-sim), before
    # its grouped experts and decode rows (see the module doc).
    "cpu-reference": PerfProfile(
        name="cpu-reference",
        overhead_s=0.0099,
        prefill_token_s=1.09e-4,
        prefill_attn_s=1.44e-7,
        decode_seq_s=4.32e-4,
        decode_ctx_s=3.33e-6,
        kv_bytes_per_token=4096,
        kv_capacity_bytes=256 * 2**20,
        cold_start_s=3.0,
        kv_transfer_bytes_per_s=1.0e9,
        cost_per_hour=0.10,
    ),
    # Roofline estimates, Mixtral-8x7B class, 2 GPUs per replica (not measured here).
    "h100": PerfProfile(
        name="h100",
        overhead_s=0.012,
        prefill_token_s=2.0e-5,
        prefill_attn_s=1.0e-10,
        decode_seq_s=1.0e-4,
        decode_ctx_s=3.0e-8,
        kv_bytes_per_token=131072,
        kv_capacity_bytes=60 * 2**30,
        cold_start_s=60.0,
        kv_transfer_bytes_per_s=2.5e10,
        cost_per_hour=2 * 4.0,
    ),
    "a100": PerfProfile(
        name="a100",
        overhead_s=0.022,
        prefill_token_s=6.0e-5,
        prefill_attn_s=3.0e-10,
        decode_seq_s=2.0e-4,
        decode_ctx_s=6.0e-8,
        kv_bytes_per_token=131072,
        kv_capacity_bytes=60 * 2**30,
        cold_start_s=75.0,
        kv_transfer_bytes_per_s=1.25e10,
        cost_per_hour=2 * 2.0,
    ),
    "l4": PerfProfile(
        name="l4",
        overhead_s=0.060,
        prefill_token_s=2.5e-4,
        prefill_attn_s=1.2e-9,
        decode_seq_s=6.0e-4,
        decode_ctx_s=2.5e-7,
        kv_bytes_per_token=131072,
        kv_capacity_bytes=12 * 2**30,
        cold_start_s=90.0,
        kv_transfer_bytes_per_s=3.0e9,
        cost_per_hour=2 * 0.8,
    ),
}


def get_profile(name: str) -> PerfProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown performance profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
