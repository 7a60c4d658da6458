"""Building the engine a worker's settings ask for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.worker.engines.engine import BatchingEngine, EngineLimits, EngineObserver
from services.worker.engines.sim.executor import FailureInjection, SimExecutor
from services.worker.engines.tokenizer import HFTokenizer
from shared.config.services import EngineKind, WorkerSettings
from shared.errors import FailedPrecondition
from shared.perfmodel import get_profile

if TYPE_CHECKING:
    from services.worker.engines.reference.parallel import ExpertParallelExecutor


def expert_parallel_executor(settings: WorkerSettings) -> ExpertParallelExecutor:
    """This rank's executor; it joins the instance's process group (at once, or in `join` for a joining rank)."""
    import torch.distributed as dist

    from services.worker.engines.reference.executor import resolve_device
    from services.worker.engines.reference.parallel import (
        GROUP_TIMEOUT,
        ExpertParallelExecutor,
        backend_for,
        rendezvous,
    )

    assert settings.model_path is not None
    if not settings.ep_join:
        dist.init_process_group(
            backend_for(resolve_device(settings.device)),
            init_method=f"tcp://{settings.ep_master}",
            rank=settings.ep_rank,
            world_size=settings.ep_size,
            timeout=GROUP_TIMEOUT,
        )
    return ExpertParallelExecutor(
        settings.model_path,
        settings.model_name,
        settings.ep_rank,
        settings.ep_size,
        host=rendezvous(settings.ep_master)[0],
        joining=settings.ep_join,
        redundant_slots=settings.ep_redundant_slots,
        node_name=settings.node_name,
        device=settings.device,
        dtype=settings.dtype,
        compute_threads=settings.compute_threads,
        decode_rows_bytes=settings.decode_rows_bytes,
    )


def run_follower(settings: WorkerSettings) -> None:
    """A rank > 0: run the leader's steps until it stops or this rank leaves. It serves and registers nothing."""
    executor = expert_parallel_executor(settings)
    executor.load()
    if settings.ep_join:
        executor.join(settings.ep_master)  # its KV cache takes the leader's shape
    else:
        executor.allocate_kv(settings.kv_cache_bytes, settings.block_size)
    executor.follow()


def build_engine(settings: WorkerSettings, observer: EngineObserver | None = None) -> BatchingEngine:
    limits = EngineLimits(
        block_size=settings.block_size,
        kv_cache_bytes=settings.kv_cache_bytes,
        max_running=settings.max_running,
        max_batch_tokens=settings.max_batch_tokens,
        max_waiting=settings.max_waiting,
    )
    if settings.engine is EngineKind.REFERENCE:
        # PyTorch loads only for the reference engine: sim workers start in a fraction of the time.
        from services.worker.engines.reference.executor import ReferenceExecutor

        if settings.model_path is None:
            raise FailedPrecondition(
                "the reference engine needs SHOAL_WORKER_MODEL_PATH (a Hugging Face-format checkpoint folder; "
                "`make tiny-model` builds one)"
            )
        executor = (
            expert_parallel_executor(settings)
            if settings.ep_size > 1
            else ReferenceExecutor(
                settings.model_path,
                settings.model_name,
                settings.device,
                settings.dtype,
                settings.compute_threads,
                settings.decode_rows_bytes,
            )
        )
        return BatchingEngine(executor, limits, observer)
    tokenizer = HFTokenizer(settings.model_path) if settings.model_path else None
    sim = SimExecutor(
        get_profile(settings.sim_profile),
        settings.model_name,
        speedup=settings.sim_speedup,
        startup_delay_s=settings.sim_startup_delay_s,
        failures=FailureInjection(settings.sim_fail_rate, settings.sim_die_after, settings.sim_stall_after),
        tokenizer=tokenizer,
    )
    return BatchingEngine(sim, limits, observer)
