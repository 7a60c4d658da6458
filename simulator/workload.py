"""Workloads: public trace formats loaded by path, synthetic generators, time and rate scaling.

A workload is a list of `Request`s in arrival order plus the block size of
their prefix hashes. Only Mooncake traces carry hashes (one per 512-token
block); requests that share leading hashes share a cacheable prefix. The
Azure and BurstGPT traces carry lengths only, so nothing in them is cached.
Bad rows are refused with the file, line and field named.
"""

from __future__ import annotations

import csv
import itertools
import math
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field

from shared.hashing import BlockHash

MOONCAKE_BLOCK = 512
FORMATS = ("auto", "mooncake", "azure", "burstgpt")


@dataclass(frozen=True, slots=True)
class Request:
    at: float  # arrival, seconds from the workload's start
    prompt_tokens: int
    output_tokens: int
    hashes: tuple[BlockHash, ...] = ()  # leading prompt blocks, for prefix caching
    session: str = ""


@dataclass(frozen=True)
class Workload:
    name: str
    requests: list[Request]
    block_size: int = MOONCAKE_BLOCK

    @property
    def span_s(self) -> float:
        return self.requests[-1].at - self.requests[0].at if self.requests else 0.0


class TraceError(ValueError):
    """A trace row that cannot be read; the message names the file, line and field."""


def _hash(value: int, salt: int = 0) -> BlockHash:
    return struct.pack("<qq", value, salt)


def _rows(
    path: Path, parse: Callable[[dict[str, object]], Request], rows: Iterator[tuple[int, object]]
) -> list[Request]:
    requests = []
    for line, row in rows:
        if not isinstance(row, dict):
            raise TraceError(f"{path}:{line}: expected an object per row")
        try:
            requests.append(parse(row))
        except (KeyError, TypeError, ValueError) as exc:
            field = f"field {exc.args[0]!r} missing" if isinstance(exc, KeyError) else str(exc)
            raise TraceError(f"{path}:{line}: {field}") from None
    if not requests:
        raise TraceError(f"{path}: no requests")
    requests.sort(key=lambda r: r.at)
    start = requests[0].at
    return [replace(r, at=r.at - start) for r in requests]


def _count(row: dict[str, object], key: str, low: int) -> int:
    value = int(str(row[key]))
    if value < 0:
        raise ValueError(f"{key} is negative ({value})")
    return max(low, value)


def load_mooncake(path: Path) -> Workload:
    """Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (512-token blocks)."""

    def parse(row: dict[str, object]) -> Request:
        ids = row.get("hash_ids", [])
        if not isinstance(ids, list):
            raise ValueError("hash_ids is not a list")
        return Request(
            at=float(str(row["timestamp"])) / 1000.0,
            prompt_tokens=_count(row, "input_length", 1),
            output_tokens=_count(row, "output_length", 1),
            hashes=tuple(_hash(int(i)) for i in ids),
        )

    lines = []
    with path.open("rb") as handle:
        for n, text in enumerate(handle, 1):
            if text.strip():
                try:
                    lines.append((n, orjson.loads(text)))
                except orjson.JSONDecodeError as exc:
                    raise TraceError(f"{path}:{n}: not a JSON object ({exc}); is it a CSV trace? (--format)") from None
    return Workload(path.name, _rows(path, parse, iter(lines)), MOONCAKE_BLOCK)


def _csv(path: Path) -> Iterator[tuple[int, object]]:
    with path.open(newline="") as handle:
        for n, row in enumerate(csv.DictReader(handle), 2):
            yield n, dict(row)


def load_azure(path: Path) -> Workload:
    """Azure LLM inference 2023 CSV: TIMESTAMP, ContextTokens, GeneratedTokens."""

    def parse(row: dict[str, object]) -> Request:
        stamp = str(row["TIMESTAMP"])[:26]  # microseconds: Python reads at most six digits
        return Request(
            at=datetime.fromisoformat(stamp).timestamp(),
            prompt_tokens=_count(row, "ContextTokens", 1),
            output_tokens=_count(row, "GeneratedTokens", 1),
        )

    return Workload(path.name, _rows(path, parse, _csv(path)))


def load_burstgpt(path: Path) -> Workload:
    """BurstGPT CSV: Timestamp (s), Request tokens, Response tokens (failed requests have 0 and are kept as 1)."""

    def parse(row: dict[str, object]) -> Request:
        return Request(
            at=float(str(row["Timestamp"])),
            prompt_tokens=_count(row, "Request tokens", 1),
            output_tokens=_count(row, "Response tokens", 1),
        )

    return Workload(path.name, _rows(path, parse, _csv(path)))


LOADERS: dict[str, Callable[[Path], Workload]] = {
    "mooncake": load_mooncake,
    "azure": load_azure,
    "burstgpt": load_burstgpt,
}


def detect_format(path: Path) -> str:
    """A trace's format from its first line: a JSON object (Mooncake) or a CSV header with Azure's or
    BurstGPT's columns."""
    with path.open("rb") as handle:
        first = next((line.strip() for line in handle if line.strip()), b"")
    if first.startswith(b"{"):
        return "mooncake"
    header = {name.strip().strip('"') for name in first.decode(errors="replace").split(",")}
    if "TIMESTAMP" in header:
        return "azure"
    if {"Timestamp", "Request tokens"} <= header:
        return "burstgpt"
    raise TraceError(
        f"{path}:1: cannot tell the trace format from {first[:80].decode(errors='replace')!r}: expected a JSON "
        "object per line (mooncake), or a CSV header with TIMESTAMP (azure) or Timestamp and Request tokens "
        "(burstgpt); name it with --format"
    )


def load_trace(path: Path, fmt: str = "auto") -> Workload:
    """Read a trace by path; `fmt` "auto" tells the format from the file's first line."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.is_file():
        raise ValueError(f"trace {path} does not exist")
    return LOADERS[detect_format(path) if fmt == "auto" else fmt](path)


def reshape(
    workload: Workload,
    *,
    time_scale: float = 1.0,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
    max_prompt: int | None = None,
    max_output: int | None = None,
    seed: int = 0,
) -> Workload:
    """Cut a window, then scale it.

    `time_scale` compresses time (2 replays the window twice as fast: same
    requests, double the rate). `rate_scale` keeps the timeline and changes how
    many requests arrive: below 1 it keeps each request with that probability;
    above 1 it adds copies at nearby times whose hashes are salted (another
    user's prompt of the same shape, not a free cache hit).
    """
    if time_scale <= 0 or rate_scale <= 0:
        raise ValueError("time_scale and rate_scale must be positive")
    end = math.inf if duration_s is None else start_s + duration_s
    window = [r for r in workload.requests if start_s <= r.at < end]
    rng = random.Random(seed)
    gap = (window[-1].at - window[0].at) / max(1, len(window) - 1) if window else 0.0
    scaled: list[Request] = []
    for request in window:
        copies = int(rate_scale) + (1 if rng.random() < rate_scale - int(rate_scale) else 0)
        for copy in range(copies):
            at = request.at - start_s + (rng.uniform(0, gap) if copy else 0.0)
            hashes = request.hashes
            if copy:
                hashes = tuple(_hash(int.from_bytes(h[:8], "little", signed=True), copy) for h in hashes)
            scaled.append(
                Request(
                    at=at / time_scale,
                    prompt_tokens=min(request.prompt_tokens, max_prompt or request.prompt_tokens),
                    output_tokens=min(request.output_tokens, max_output or request.output_tokens),
                    hashes=hashes,
                    session=request.session,
                )
            )
    scaled.sort(key=lambda r: r.at)
    if limit is not None:
        scaled = scaled[:limit]
    return Workload(workload.name, scaled, workload.block_size)


class SyntheticSpec(BaseModel):
    """A Poisson workload with log-normal lengths; optionally a rate that swings like a day, and
    groups of requests sharing a prompt prefix."""

    model_config = ConfigDict(extra="forbid")

    rate_rps: float = Field(default=10.0, gt=0, le=1e6)
    peak_rps: float | None = Field(
        default=None, gt=0, le=1e6, description="With period_s: the rate swings from rate_rps up to this and back."
    )
    period_s: float = Field(default=3600.0, gt=0, description="Seconds of one low-high-low swing (a compressed day).")
    duration_s: float = Field(default=60.0, gt=0, le=1e7)
    prompt_mean: int = Field(default=1024, ge=1, le=1_000_000)
    output_mean: int = Field(default=128, ge=1, le=100_000)
    sigma: float = Field(default=0.6, ge=0, le=3, description="Log-normal shape of both lengths.")
    prefix_groups: int = Field(default=0, ge=0, description="Distinct shared prefixes (0: none shared).")
    prefix_tokens: int = Field(default=0, ge=0, description="Tokens of each shared prefix.")
    prefix_skew: float = Field(
        default=0.0,
        ge=0,
        le=4,
        description="Zipf exponent of the groups' popularity (0: all alike; 1: the k-th group is k times rarer "
        "than the first, as a few system prompts take most of real traffic).",
    )
    block_size: int = Field(default=256, ge=1)
    seed: int = 0


def synthetic(spec: SyntheticSpec) -> Workload:
    rng = random.Random(spec.seed)
    mu = -(spec.sigma**2) / 2  # so that the log-normal factor has mean 1
    requests = []
    groups = range(spec.prefix_groups)
    popularity = list(itertools.accumulate(1 / (g + 1) ** spec.prefix_skew for g in groups))
    top = max(spec.rate_rps, spec.peak_rps or 0.0)
    t = rng.expovariate(top)
    while t < spec.duration_s:
        if spec.peak_rps is not None:
            # A non-homogeneous Poisson process by thinning: keep an arrival with probability rate(t) / top.
            swing = (1 - math.cos(2 * math.pi * t / spec.period_s)) / 2
            if rng.random() * top > spec.rate_rps + (spec.peak_rps - spec.rate_rps) * swing:
                t += rng.expovariate(top)
                continue
        prompt = max(1, round(spec.prompt_mean * rng.lognormvariate(mu, spec.sigma)))
        output = max(1, round(spec.output_mean * rng.lognormvariate(mu, spec.sigma)))
        hashes: tuple[BlockHash, ...] = ()
        session = ""
        if spec.prefix_groups and spec.prefix_tokens:
            # randrange when all are alike: the same seed gives the same workload as before skew existed.
            group = rng.choices(groups, cum_weights=popularity)[0] if spec.prefix_skew else rng.randrange(len(groups))
            prompt += spec.prefix_tokens
            hashes = tuple(_hash(group, -1 - b) for b in range(spec.prefix_tokens // spec.block_size))
            session = f"group-{group}"
        requests.append(Request(t, prompt, output, hashes, session))
        t += rng.expovariate(top)
    return Workload("synthetic", requests, spec.block_size)
