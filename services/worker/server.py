"""The Worker gRPC service: validates requests and drives the engine.

Every request is checked before it reaches the engine (model name, token ids
in the vocabulary, sampling ranges, prompt length); a bad one gets
INVALID_ARGUMENT with a message naming the field, and the engine keeps
serving. A client that cancels a stream aborts its request. P/D hand-offs:
Prefill writes the prompt's blocks to the requested sink; Decode imports
them from the kvstore or a peer within the source's deadline and recomputes
whatever it could not get (a store or peer that is down slows a request but
never fails it; corrupt data is refused).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import replace
from typing import TypeAlias

from grpc import aio

from services.worker.engines.base import (
    Engine,
    EngineRequest,
    ExpertParallel,
    Finish,
    KVBlock,
    Sampling,
    TokenLogprob,
    TokenOutput,
)
from services.worker.engines.experts import ExpertMap
from services.worker.metrics import WorkerMetrics
from shared.errors import FailedPrecondition, InvalidArgument, ShoalError
from shared.policies.placement import EMPTY, Topology, layer_report
from shared.rpc.blocks import CorruptBlock, block_chunks, missing_chunk
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.pool import ClientPool
from shared.rpc.security import RpcSecurity
from shared.rpc.shoal.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from shared.rpc.worker_client import WorkerClient
from shared.telemetry.logging import get_logger
from shared.types.workers import WorkerLoad

log = get_logger("shoal.worker.server")

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20
DEFAULT_KV_TIMEOUT_S = 10.0
_FINISH = {
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.ABORT: common_pb2.FINISH_REASON_ABORT,
}

Context: TypeAlias = aio.ServicerContext


def load_report(load: WorkerLoad) -> common_pb2.LoadReport:
    return common_pb2.LoadReport(**load.model_dump())


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        engine: Engine,
        metrics: WorkerMetrics,
        security: RpcSecurity,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.kvstores: ClientPool[KVStoreClient] = ClientPool(lambda a: KVStoreClient(a, security))
        self.peers: ClientPool[WorkerClient] = ClientPool(lambda a: WorkerClient(a, security))

    async def close(self) -> None:
        await self.kvstores.close()
        await self.peers.close()

    # -- validation -----------------------------------------------------------

    def _sampling(self, params: common_pb2.SamplingParams) -> Sampling:
        if params.max_tokens < 1:
            raise InvalidArgument("sampling.max_tokens must be at least 1", param="max_tokens")
        if not 0.0 <= params.temperature <= 2.0:
            raise InvalidArgument(
                f"sampling.temperature must be within [0, 2], got {params.temperature:g}", param="temperature"
            )
        if not 0.0 <= params.top_p <= 1.0:
            raise InvalidArgument(f"sampling.top_p must be within (0, 1], got {params.top_p:g}", param="top_p")
        if len(params.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in params.stop):
            raise InvalidArgument(
                f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters",
                param="stop",
            )
        self._check_ids(params.stop_token_ids, "stop_token_ids")
        self._check_logit_shaping(params)
        return Sampling(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p or 1.0,
            top_k=params.top_k,
            seed=params.seed if params.HasField("seed") else None,
            stop_token_ids=tuple(params.stop_token_ids),
            stop=tuple(params.stop),
            ignore_eos=params.ignore_eos,
            logit_bias=tuple(sorted(params.logit_bias.items())),
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty or 1.0,
            min_tokens=params.min_tokens,
            logprobs=params.logprobs if params.HasField("logprobs") else None,
            json_schema=params.json_schema,
        )

    def _check_logit_shaping(self, params: common_pb2.SamplingParams) -> None:
        if len(params.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidArgument(f"logit_bias holds more than {MAX_LOGIT_BIAS} entries", param="logit_bias")
        self._check_ids(list(params.logit_bias), "logit_bias")
        bad = next((b for b in params.logit_bias.values() if not -100.0 <= b <= 100.0), None)
        if bad is not None:
            raise InvalidArgument(f"logit_bias values must be within [-100, 100], got {bad:g}", param="logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(params, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidArgument(f"sampling.{name} must be within [-2, 2], got {value:g}", param=name)
        if not 0.0 <= params.repetition_penalty <= 2.0:
            raise InvalidArgument(
                f"sampling.repetition_penalty must be within (0, 2], got {params.repetition_penalty:g}",
                param="repetition_penalty",
            )
        if params.HasField("logprobs") and params.logprobs > MAX_TOP_LOGPROBS:
            raise InvalidArgument(
                f"sampling.logprobs asks for {params.logprobs} alternatives; at most {MAX_TOP_LOGPROBS}",
                param="logprobs",
            )
        if params.min_tokens > params.max_tokens:
            raise InvalidArgument(
                f"sampling.min_tokens ({params.min_tokens}) exceeds max_tokens ({params.max_tokens})",
                param="min_tokens",
            )

    def _check_ids(self, ids: Sequence[int], field: str) -> None:
        vocab = self.engine.vocab_size
        bad = next((i for i in ids if i >= vocab), None)
        if bad is not None:
            raise InvalidArgument(f"{field} holds token id {bad}; the vocabulary has {vocab} ids", param=field)

    def engine_request(
        self, request: worker_pb2.GenerateRequest, imported: list[KVBlock] | None = None
    ) -> EngineRequest:
        """The validated engine request for `request` (InvalidArgument naming the field otherwise)."""
        if not request.request_id:
            raise InvalidArgument("request_id is required", param="request_id")
        if request.model != self.engine.model_name:
            raise InvalidArgument(
                f"unknown model {request.model!r}; this worker serves {self.engine.model_name!r}",
                param="model",
            )
        if not request.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids is empty", param="prompt_token_ids")
        self._check_ids(request.prompt_token_ids, "prompt_token_ids")
        self._check_ids(request.resume_token_ids, "resume_token_ids")
        return EngineRequest(
            request_id=request.request_id,
            prompt=list(request.prompt_token_ids),
            sampling=self._sampling(request.sampling),
            resume=list(request.resume_token_ids),
            resume_text_chars=request.resume_text_chars,
            imported=imported or [],
        )

    # -- generation -----------------------------------------------------------

    @staticmethod
    def already_done(request: EngineRequest) -> TokenOutput | None:
        """The final output of a request whose resumed tokens already reach max_tokens (nothing to run)."""
        if len(request.resume) < request.sampling.max_tokens:
            return None
        return TokenOutput([], "", Finish.LENGTH, len(request.prompt), len(request.resume))

    @staticmethod
    def finish_fields(output: TokenOutput, message: worker_pb2.GenerateResponse | worker_pb2.StreamEvent) -> None:
        """Set the finish reason and usage of a final output on a reply message."""
        assert output.finish is not None
        message.finish_reason = _FINISH[output.finish]
        usage = message.usage
        usage.prompt_tokens = output.prompt_tokens
        usage.completion_tokens = output.completion_tokens
        usage.cached_prompt_tokens = output.cached_tokens

    async def compiled(self, request: EngineRequest) -> EngineRequest:
        """The request with its JSON schema's grammar compiled, when it has one (cached per schema)."""
        if request.sampling.json_schema and request.grammar is None:
            request.grammar = await self.engine.compile_grammar(request.sampling.json_schema)
        return request

    async def _stream(self, request: EngineRequest) -> AsyncIterator[worker_pb2.GenerateResponse]:
        done = self.already_done(request)
        if done is not None:
            yield _response(done)
            return
        async for output in self.engine.generate(await self.compiled(request)):
            yield _response(output)

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        async for response in self._stream(self.engine_request(request)):
            yield response

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: Context
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        blocks = await self.import_kv(request.kv_source)
        async for response in self._stream(self.engine_request(request.request, blocks)):
            yield response

    async def import_kv(self, source: worker_pb2.KVSource) -> list[KVBlock]:
        """Import a decode's KV from its source within the source's deadline. A source that is down
        or slow yields fewer blocks (the rest is recomputed); corrupt data is InvalidArgument."""
        hashes = list(source.block_hashes)
        if not hashes:
            return []
        timeout = source.timeout_ms / 1000 if source.timeout_ms else DEFAULT_KV_TIMEOUT_S
        origin = source.WhichOneof("origin")
        blocks: list[KVBlock] = []
        try:
            if origin == "kvstore":
                blocks = await self.kvstores.get(source.kvstore.address).fetch_prefix(hashes, timeout)
            elif origin == "peer":
                blocks = await asyncio.wait_for(self.peers.get(source.peer.address).fetch_kv(hashes, timeout), timeout)
        except CorruptBlock as exc:
            raise InvalidArgument(f"imported KV is corrupt: {exc.message}", param="kv_source") from None
        except (ShoalError, TimeoutError) as exc:
            log.warning("kv import failed; recomputing the prompt", origin=origin, error=str(exc))
        self.metrics.kv_imports.labels("imported" if blocks else "fallback").inc()
        return blocks

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: Context) -> worker_pb2.PrefillResponse:
        generate = worker_pb2.GenerateRequest(
            request_id=request.request_id,
            model=request.model,
            prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling,
        )
        engine_request = await self.compiled(self.engine_request(generate))
        wanted = engine_request.sampling.max_tokens
        engine_request.sampling = replace(engine_request.sampling, max_tokens=1)
        engine_request.export_prompt_kv = True
        engine_request.continues = wanted > 1
        tokens: list[int] = []
        logprobs: list[TokenLogprob] = []
        text = ""
        final: TokenOutput | None = None
        async for output in self.engine.generate(engine_request):
            tokens.extend(output.token_ids)
            logprobs.extend(output.logprobs)
            text += output.text
            final = output
        assert final is not None and final.finish is not None
        finish = common_pb2.FINISH_REASON_UNSPECIFIED
        if final.finish is not Finish.LENGTH or wanted <= 1:
            finish = _FINISH[final.finish]
        blocks = final.exported or []
        stored = await self._sink(request.sink, blocks)
        response = worker_pb2.PrefillResponse(
            block_hashes=[block.hash for block in blocks] if stored else [],
            first_token_id=tokens[0] if tokens else 0,
            first_text=text,
            finish_reason=finish,
            usage=_usage(final),
            block_size=self.engine.block_size,
        )
        if logprobs:
            response.first_logprob.CopyFrom(logprobs_to_wire(logprobs[:1])[0])
        return response

    async def _sink(self, sink: worker_pb2.KVSink, blocks: list[KVBlock]) -> bool:
        target = sink.WhichOneof("target")
        if target == "kvstore":
            client = self.kvstores.get(sink.kvstore.address)
            return await client.store_blocks(
                blocks, DEFAULT_KV_TIMEOUT_S, session_id=sink.session_id, pin_ttl_s=sink.pin_ttl_s
            )
        # `hold` (or no sink): the blocks stay in this worker's prefix cache.
        return True

    async def Abort(self, request: worker_pb2.AbortRequest, context: Context) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=self.engine.abort(request.request_id))

    async def FetchKV(
        self, request: worker_pb2.FetchKVRequest, context: Context
    ) -> AsyncIterator[common_pb2.BlockChunk]:
        blocks = await self.engine.export_kv(list(request.block_hashes))
        for chunk in block_chunks(blocks):
            yield chunk
        for block_hash in request.block_hashes[len(blocks) :]:
            yield missing_chunk(block_hash)

    # -- control --------------------------------------------------------------

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context: Context) -> common_pb2.LoadReport:
        return load_report(self.engine.load())

    async def Drain(self, request: worker_pb2.DrainRequest, context: Context) -> worker_pb2.DrainResponse:
        if request.resume:
            self.engine.draining = False
            load = self.engine.load()
            return worker_pb2.DrainResponse(
                drained=False, running_requests=load.running_requests, waiting_requests=load.waiting_requests
            )
        self.engine.draining = True
        drained = await self.engine.wait_idle(max(0.0, request.wait_s))
        load = self.engine.load()
        return worker_pb2.DrainResponse(
            drained=drained,
            running_requests=load.running_requests,
            waiting_requests=load.waiting_requests,
        )

    async def ExpertStats(
        self, request: worker_pb2.ExpertStatsRequest, context: Context
    ) -> worker_pb2.ExpertStatsResponse:
        if request.window_s < 0:
            raise InvalidArgument("window_s must not be negative", param="window_s")
        stats = self.engine.expert_load(request.window_s)
        response = worker_pb2.ExpertStatsResponse(
            window_s=stats.window_s,
            num_experts=len(stats.counts[0]) if stats.counts else 0,
            layers=[
                worker_pb2.LayerExpertLoad(layer=layer, tokens=counts) for layer, counts in enumerate(stats.counts)
            ],
            expert_map_version=stats.map_version,
        )
        parallel = self.engine.expert_parallel()
        if parallel is not None:
            ranks, nodes, current = parallel.expert_map()
            width, slots = current.to_slots(ranks)
            response.expert_map.CopyFrom(
                common_pb2.ExpertMap(
                    version=current.version,
                    num_ranks=ranks,
                    slots_per_rank=width,
                    layers=[common_pb2.LayerPlacement(layer=i, slot_experts=s) for i, s in enumerate(slots)],
                    num_nodes=nodes,
                )
            )
            topo = Topology(ranks=ranks, nodes=nodes, slots_per_rank=width)
            _, balance = layer_report(slots, [[float(t) for t in c] for c in stats.counts], topo)
            for layer, value in enumerate(balance):
                self.metrics.expert_balance.labels(str(layer)).set(value)
        return response

    # Live expert migration: each call runs between two engine steps on every rank.
    async def StageExperts(
        self, request: worker_pb2.StageExpertsRequest, context: Context
    ) -> worker_pb2.StageExpertsResponse:
        parallel = self._expert_parallel()
        target = self._target_map(parallel, request.target)
        from_peer = request.source == worker_pb2.WEIGHT_SOURCE_PEER
        copies, size = await parallel.stage_experts(request.migration_id, target, list(request.layers), from_peer)
        self.metrics.expert_bytes.labels("staged").inc(size)
        return worker_pb2.StageExpertsResponse(staged_copies=copies, staged_bytes=size)

    async def CommitExpertMap(
        self, request: worker_pb2.CommitExpertMapRequest, context: Context
    ) -> worker_pb2.CommitExpertMapResponse:
        stall = await self._expert_parallel().commit_expert_map(request.migration_id, request.version)
        self.metrics.expert_commit_stall.observe(stall)
        return worker_pb2.CommitExpertMapResponse(version=request.version, stall_s=stall)

    async def ReleaseExperts(
        self, request: worker_pb2.ReleaseExpertsRequest, context: Context
    ) -> worker_pb2.ReleaseExpertsResponse:
        copies, size = await self._expert_parallel().release_experts(request.migration_id, request.discard_staged)
        self.metrics.expert_bytes.labels("discarded" if request.discard_staged else "released").inc(size)
        return worker_pb2.ReleaseExpertsResponse(released_copies=copies, released_bytes=size)

    async def ResizeExperts(
        self, request: worker_pb2.ResizeExpertsRequest, context: Context
    ) -> worker_pb2.ResizeExpertsResponse:
        if request.ranks < 1:
            raise InvalidArgument("ranks must be at least 1", param="ranks")
        sent, stall = await self._expert_parallel().resize_experts(request.ranks, request.master)
        self.metrics.expert_regroup_stall.observe(stall)
        self.metrics.expert_ranks.set(request.ranks)
        log.info("expert-parallel instance regrouped", ranks=request.ranks, synced_bytes=sent, stall_s=stall)
        return worker_pb2.ResizeExpertsResponse(ranks=request.ranks, synced_bytes=sent, stall_s=stall)

    def _expert_parallel(self) -> ExpertParallel:
        parallel = self.engine.expert_parallel()
        if parallel is None:
            raise FailedPrecondition(
                "this worker holds every expert itself (no expert parallelism); it has no expert map to change"
            )
        return parallel

    @staticmethod
    def _target_map(parallel: ExpertParallel, wire: common_pb2.ExpertMap) -> ExpertMap:
        ranks, _, current = parallel.expert_map()
        if wire.num_ranks != ranks or wire.slots_per_rank == 0:
            raise InvalidArgument(f"the target map must span this instance's {ranks} ranks", param="target")
        layers = sorted(wire.layers, key=lambda layer: layer.layer)
        if [layer.layer for layer in layers] != list(range(len(current.holders))):
            raise InvalidArgument(f"the target map must list layers 0..{len(current.holders) - 1}", param="target")
        experts = len(current.holders[0])
        if any(not EMPTY <= e < experts for layer in layers for e in layer.slot_experts):
            raise InvalidArgument(f"expert ids must be below {experts} (or {EMPTY}: an empty slot)", param="target")
        slots = [list(layer.slot_experts) for layer in layers]
        return ExpertMap.from_slots(wire.version, ranks, wire.slots_per_rank, slots, experts)


def _usage(output: TokenOutput) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        cached_prompt_tokens=output.cached_tokens,
    )


def logprobs_to_wire(entries: Iterable[TokenLogprob]) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token_id=entry.token_id,
            logprob=entry.logprob,
            top_token_ids=[token for token, _ in entry.top],
            top_logprobs=[logprob for _, logprob in entry.top],
        )
        for entry in entries
    ]


def _response(output: TokenOutput) -> worker_pb2.GenerateResponse:
    response = worker_pb2.GenerateResponse(
        token_ids=output.token_ids, text=output.text, logprobs=logprobs_to_wire(output.logprobs)
    )
    if output.finish is not None:
        WorkerServicer.finish_fields(output, response)
    return response
