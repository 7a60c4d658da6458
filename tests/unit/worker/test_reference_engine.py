"""The reference engine against `transformers` on the same checkpoint, and its invariants."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker.engines.base import Finish
from services.worker.engines.engine import BatchingEngine
from services.worker.engines.grammar import Grammars
from services.worker.engines.scheduler import Item
from services.worker.engines.tokenizer import HFTokenizer
from shared.errors import InvalidArgument
from tests.support.engines import collect, collect_all, prompts, reference_engine, request
from tests.support.models import transformers_greedy, transformers_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def hf_model(tiny_model: Path) -> Any:
    return transformers_model(tiny_model)


@pytest.fixture
async def engine(tiny_model: Path) -> AsyncIterator[BatchingEngine]:
    eng = reference_engine(tiny_model)
    await eng.start()
    yield eng
    await eng.stop()


async def test_logits_match_transformers(engine: BatchingEngine, hf_model: Any) -> None:
    batch = prompts(4, [7, 16, 33, 50])

    def forward() -> list[torch.Tensor]:
        scheduler = engine.scheduler
        items = []
        for i, prompt in enumerate(batch):
            seq = scheduler.new_sequence(request(f"l{i}", prompt), output=None)  # type: ignore[arg-type]
            seq.block_ids = [scheduler.blocks.allocate() for _ in range(scheduler.blocks_for(len(prompt)))]  # type: ignore[misc]
            items.append(Item(seq, 0, len(prompt), True))
        logits, _ = engine.executor.forward(items, all_logits=True)  # type: ignore[attr-defined]
        return list(torch.split(logits, [len(p) for p in batch]))

    ours = engine.call_between_steps(forward).result(timeout=60)
    for prompt, got in zip(batch, ours, strict=True):
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0].float()
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


async def test_greedy_output_matches_transformers_generate(engine: BatchingEngine, hf_model: Any) -> None:
    batch = prompts(8, [5, 12, 17, 30, 48, 64, 3, 90], seed=1)
    results = await collect_all(engine, [request(f"g{i}", p, max_tokens=64) for i, p in enumerate(batch)])
    for prompt, result in zip(batch, results, strict=True):
        assert result.tokens == transformers_greedy(hf_model, prompt, 64)
        assert result.finish is Finish.LENGTH


async def test_without_memory_for_decode_rows_the_output_is_the_same(tiny_model: Path, hf_model: Any) -> None:
    engine = reference_engine(tiny_model, decode_rows_bytes=0)  # every step copies contexts layer by layer
    await engine.start()
    try:
        batch = prompts(4, [5, 30, 64, 3], seed=1)
        results = await collect_all(engine, [request(f"n{i}", p, max_tokens=40) for i, p in enumerate(batch)])
    finally:
        await engine.stop()
    for prompt, result in zip(batch, results, strict=True):
        assert result.tokens == transformers_greedy(hf_model, prompt, 40)


async def test_tokens_do_not_depend_on_the_batch(engine: BatchingEngine) -> None:
    batch = prompts(6, [9, 20, 41], seed=2)
    alone = [await collect(engine, request(f"a{i}", p, max_tokens=24)) for i, p in enumerate(batch)]
    together = await collect_all(engine, [request(f"b{i}", p, max_tokens=24) for i, p in enumerate(batch)])
    assert [r.tokens for r in alone] == [r.tokens for r in together]


async def test_preemption_does_not_change_tokens(tiny_model: Path) -> None:
    batch = prompts(8, [40, 60], seed=3)
    roomy = reference_engine(tiny_model)
    # 40 blocks of 16 tokens cannot hold 8 requests of ~100 tokens at once.
    tight = reference_engine(tiny_model, kv_cache_bytes=40 * 65536)
    await roomy.start()
    await tight.start()
    try:
        expected = await collect_all(roomy, [request(f"r{i}", p, max_tokens=48) for i, p in enumerate(batch)])
        got = await collect_all(tight, [request(f"t{i}", p, max_tokens=48) for i, p in enumerate(batch)])
        assert tight.scheduler.preemptions > 0
        assert [r.tokens for r in got] == [r.tokens for r in expected]
    finally:
        await roomy.stop()
        await tight.stop()


async def test_seeded_sampling_is_reproducible_and_batch_independent(engine: BatchingEngine) -> None:
    prompt = prompts(1, [25], seed=4)[0]
    sampled: dict[str, Any] = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    first = await collect(engine, request("s1", prompt, max_tokens=32, **sampled))
    crowd = [request(f"c{i}", p, max_tokens=32) for i, p in enumerate(prompts(5, [30], seed=5))]
    second, *_ = await collect_all(engine, [request("s2", prompt, max_tokens=32, **sampled), *crowd])
    other = await collect(engine, request("s3", prompt, max_tokens=32, **{**sampled, "seed": 99}))
    assert first.tokens == second.tokens
    assert other.tokens != first.tokens


async def test_export_then_import_continues_identically(tiny_model: Path) -> None:
    prompt = prompts(1, [70], seed=6)[0]
    a = reference_engine(tiny_model)
    b = reference_engine(tiny_model)
    await a.start()
    await b.start()
    try:
        whole = await collect(a, request("whole", prompt, max_tokens=40))
        prefill = await collect(a, request("pre", prompt, max_tokens=1, export=True))
        assert len(prefill.exported) == len(prompt) // 16
        decoded = await collect(
            b, request("dec", prompt, max_tokens=40, resume=prefill.tokens, imported=prefill.exported)
        )
        assert decoded.cached_tokens == 64  # 4 imported blocks; the tail is recomputed
        assert prefill.tokens + decoded.tokens == whole.tokens
    finally:
        await a.stop()
        await b.stop()


async def test_prefix_cache_reuses_blocks(engine: BatchingEngine) -> None:
    prompt = prompts(1, [80], seed=7)[0]
    first = await collect(engine, request("p1", prompt, max_tokens=8))
    second = await collect(engine, request("p2", prompt, max_tokens=8))
    assert first.cached_tokens == 0
    assert second.cached_tokens == 64  # (80 - 1) // 16 full blocks
    assert second.tokens == first.tokens
    events = engine.drain_kv_events()
    assert sum(1 for op, _ in events if op == "add") >= 5


async def test_stop_strings_ids_and_max_tokens(engine: BatchingEngine) -> None:
    prompt = prompts(1, [10], seed=8)[0]
    free = await collect(engine, request("f", prompt, max_tokens=30))
    assert free.finish is Finish.LENGTH and len(free.tokens) == 30
    stop_id = free.tokens[5]
    by_id = await collect(engine, request("i", prompt, max_tokens=30, stop_token_ids=(stop_id,)))
    assert by_id.finish is Finish.STOP
    assert by_id.tokens == free.tokens[: free.tokens.index(stop_id) + 1]
    needle = free.text[8:11]
    by_text = await collect(engine, request("t", prompt, max_tokens=30, stop=(needle,)))
    assert by_text.finish is Finish.STOP
    assert by_text.text == free.text[: free.text.index(needle)]
    assert needle not in by_text.text


async def test_abort_ends_the_stream_and_frees_blocks(engine: BatchingEngine) -> None:
    stream = engine.generate(request("ab", prompts(1, [20])[0], max_tokens=2000))
    first = await anext(stream)
    assert first.finish is None
    assert engine.abort("ab")
    finishes = [output.finish async for output in stream]
    assert finishes[-1] is Finish.ABORT
    assert engine.load().running_requests == 0
    assert engine.load().kv_blocks_used == 0


@pytest.mark.parametrize(
    ("kv_blocks", "prompt_len", "max_tokens", "message"),
    [(1024, 4096, 1, "context holds 4096"), (8, 100, 100, "needs 13 KV blocks; the worker holds 8")],
    ids=["prompt-over-context", "more-kv-than-the-worker-has"],
)
async def test_requests_that_cannot_fit_are_refused(
    tiny_model: Path, kv_blocks: int, prompt_len: int, max_tokens: int, message: str
) -> None:
    engine = reference_engine(tiny_model, kv_cache_bytes=kv_blocks * 65536)
    await engine.start()
    try:
        with pytest.raises(InvalidArgument, match=message):
            engine.generate(request("big", [20] * prompt_len, max_tokens=max_tokens))
        assert (await collect(engine, request("ok", [20] * 5, max_tokens=2))).finish is Finish.LENGTH
    finally:
        await engine.stop()


async def test_corrupt_imported_kv_is_refused(tiny_model: Path, engine: BatchingEngine) -> None:
    prompt = prompts(1, [40], seed=9)[0]
    exported = (await collect(engine, request("x", prompt, max_tokens=1, export=True))).exported
    bad = exported[0].__class__(exported[0].hash, exported[0].header, b"\0" * len(exported[0].payload))
    with pytest.raises(InvalidArgument, match="corrupt"):
        engine.generate(request("y", prompt, imported=[bad, *exported[1:]]))
    foreign = [exported[1]]  # block 1 where block 0 belongs
    with pytest.raises(InvalidArgument, match="hash chain"):
        engine.generate(request("z", prompt, imported=foreign))


async def test_a_prompt_longer_than_the_step_budget_is_prefilled_in_chunks_exactly(
    tiny_model: Path, hf_model: Any
) -> None:
    """Chunked prefill: prompts of 90 and 37 tokens under a 16-token step budget are computed over many
    steps, and their greedy tokens are transformers' (each chunk attends to the KV the earlier chunks of
    its prompt left in the paged cache)."""
    engine = reference_engine(tiny_model, max_batch_tokens=16)
    steps: list[list[tuple[str, int, int]]] = []
    await engine.start()
    schedule = engine.scheduler.schedule  # made at start; idle until the requests below

    def recording() -> list[Item]:
        items = schedule()
        steps.append([(item.seq.request.request_id, item.start, item.length) for item in items])
        return items

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    try:
        batch = prompts(2, [90, 37], seed=5)
        results = await collect_all(engine, [request(f"c{i}", p, max_tokens=12) for i, p in enumerate(batch)])
    finally:
        await engine.stop()
    assert all(sum(length for _, _, length in step) <= 16 for step in steps)
    for index, prompt in enumerate(batch):
        chunks = [(start, length) for step in steps for rid, start, length in step if rid == f"c{index}"]
        prefill = [(start, length) for start, length in chunks if start < len(prompt)]
        # Contiguous chunks covering the prompt once, over more steps than one budget allows.
        assert [start for start, _ in prefill] == [
            sum(length for _, length in prefill[:i]) for i in range(len(prefill))
        ]
        assert sum(length for _, length in prefill) == len(prompt) and len(prefill) >= -(-len(prompt) // 16)
        assert results[index].tokens == transformers_greedy(hf_model, prompt, 12)


# -- logit shaping, against transformers' logits processors --------------------


class _OpenAIPenalties:
    """OpenAI's presence and frequency penalties as a transformers logits processor, written from
    OpenAI's formula: logit -= count * frequency + (count > 0) * presence, counting the output only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for token in set(input_ids[0, self.prompt_len :].tolist()):
            count = int((input_ids[0, self.prompt_len :] == token).sum())
            scores[0, token] -= count * self.frequency + self.presence
        return scores


def _processors(*processors: Any) -> Any:
    from transformers import LogitsProcessorList

    return LogitsProcessorList(processors)


async def test_repetition_penalty_matches_transformers(engine: BatchingEngine, hf_model: Any) -> None:
    batch = prompts(3, [6, 20, 41], seed=11)
    results = await collect_all(
        engine, [request(f"rp{i}", p, max_tokens=40, repetition_penalty=1.7) for i, p in enumerate(batch)]
    )
    plain = await collect(engine, request("rp-plain", batch[0], max_tokens=40))
    for prompt, result in zip(batch, results, strict=True):
        assert result.tokens == transformers_greedy(hf_model, prompt, 40, repetition_penalty=1.7)
    assert results[0].tokens != plain.tokens  # the penalty changed something


async def test_presence_and_frequency_penalties_follow_openai(engine: BatchingEngine, hf_model: Any) -> None:
    batch = prompts(2, [9, 30], seed=12)
    shaped = [
        request(f"pf{i}", p, max_tokens=40, presence_penalty=0.8, frequency_penalty=1.5) for i, p in enumerate(batch)
    ]
    results = await collect_all(engine, shaped)
    for prompt, result in zip(batch, results, strict=True):
        reference = _processors(_OpenAIPenalties(len(prompt), presence=0.8, frequency=1.5))
        assert result.tokens == transformers_greedy(hf_model, prompt, 40, logits_processor=reference)
    plain = await collect(engine, request("pf-plain", batch[0], max_tokens=40))
    assert results[0].tokens != plain.tokens


async def test_logit_bias_matches_transformers(engine: BatchingEngine, hf_model: Any) -> None:
    from transformers import SequenceBiasLogitsProcessor

    prompt = prompts(1, [14], seed=13)[0]
    plain = await collect(engine, request("lb-plain", prompt, max_tokens=30))
    # Push the first output token away and two others towards the front.
    bias = {plain.tokens[0]: -100.0, 7: 4.0, 99: 2.5}
    biased = await collect(engine, request("lb", prompt, max_tokens=30, logit_bias=tuple(bias.items())))
    reference = _processors(SequenceBiasLogitsProcessor([[[token], value] for token, value in bias.items()]))
    assert biased.tokens == transformers_greedy(hf_model, prompt, 30, logits_processor=reference)
    assert plain.tokens[0] not in biased.tokens


async def test_min_tokens_holds_back_the_stop_token(engine: BatchingEngine, hf_model: Any) -> None:
    from transformers import MinNewTokensLengthLogitsProcessor

    prompt = prompts(1, [18], seed=14)[0]
    free = await collect(engine, request("mt-free", prompt, max_tokens=40))
    stop_id = free.tokens[2]
    early = await collect(engine, request("mt-early", prompt, max_tokens=40, stop_token_ids=(stop_id,)))
    held = await collect(engine, request("mt", prompt, max_tokens=40, stop_token_ids=(stop_id,), min_tokens=12))
    assert early.tokens == free.tokens[: free.tokens.index(stop_id) + 1]
    assert len(held.tokens) >= 12 and stop_id not in held.tokens[:12]
    reference = _processors(MinNewTokensLengthLogitsProcessor(len(prompt), 12, stop_id))
    expected = transformers_greedy(hf_model, prompt, 40, logits_processor=reference, eos_token_id=stop_id)
    assert held.tokens == expected
    assert held.finish is (Finish.STOP if stop_id in held.tokens else Finish.LENGTH)


async def test_logprobs_are_transformers_log_softmax(engine: BatchingEngine, hf_model: Any) -> None:
    """The reported log-probabilities are the model's own (before shaping and temperature), for greedy
    and sampled requests in one batch, with the asked number of alternatives."""
    batch = prompts(2, [11, 26], seed=15)
    asked = [
        request("lp-greedy", batch[0], max_tokens=12, logprobs=4),
        request("lp-sampled", batch[1], max_tokens=12, logprobs=0, temperature=1.3, seed=5, frequency_penalty=1.0),
        request("lp-none", batch[1], max_tokens=12),
    ]
    outputs: list[list[Any]] = [[], [], []]

    async def gather(index: int) -> None:
        async for output in engine.generate(asked[index]):
            assert len(output.logprobs) == (len(output.token_ids) if index < 2 else 0)
            outputs[index].extend(output.logprobs)

    await asyncio.gather(*(gather(i) for i in range(3)))
    for prompt, entries, top in zip(batch, outputs[:2], (4, 0), strict=True):
        tokens = [entry.token_id for entry in entries]
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + tokens])).logits[0].float()
        expected = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        for position, entry in enumerate(entries):
            row = expected[position]
            assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
            assert len(entry.top) == top
            best = torch.topk(row, top)
            assert [token for token, _ in entry.top] == best.indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)


# -- structured output -----------------------------------------------------------

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["ok", "color", "tags"],
    "additionalProperties": False,
}


async def test_json_schema_output_parses_and_matches(engine: BatchingEngine) -> None:
    import jsonschema

    schema = json.dumps(ANSWER_SCHEMA)
    batch = prompts(6, [7, 19, 33], seed=16)
    constrained = [
        request(f"js{i}", p, max_tokens=80, json_schema=schema, temperature=1.0 if i % 2 else 0.0, seed=i)
        for i, p in enumerate(batch)
    ]
    free = await collect(engine, request("js-free", batch[0], max_tokens=20))
    results = await collect_all(engine, constrained)
    for result in results:
        jsonschema.validate(json.loads(result.text), ANSWER_SCHEMA)
        assert result.finish is Finish.STOP  # a complete match ends the request, though it ignores EOS
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)  # the random model alone writes no JSON


async def test_a_resumed_constrained_request_continues_identically(engine: BatchingEngine) -> None:
    schema = json.dumps(ANSWER_SCHEMA)
    prompt = prompts(1, [21], seed=17)[0]
    whole = await collect(engine, request("jr-whole", prompt, max_tokens=80, json_schema=schema))
    cut = 9
    resumed = await collect(
        engine, request("jr-rest", prompt, max_tokens=80, json_schema=schema, resume=whole.tokens[:cut])
    )
    assert whole.tokens[:cut] + resumed.tokens == whole.tokens
    with pytest.raises(InvalidArgument, match="do not follow"):
        await collect(engine, request("jr-bad", prompt, max_tokens=80, json_schema=schema, resume=[20, 20]))


async def test_a_schema_that_cannot_be_compiled_is_refused(engine: BatchingEngine) -> None:
    prompt = prompts(1, [5], seed=18)[0]
    with pytest.raises(InvalidArgument, match="cannot be compiled") as refused:
        await collect(engine, request("jb", prompt, json_schema=json.dumps({"type": "nonsense"})))
    assert refused.value.fields["param"] == "response_format"


async def test_a_schema_that_compiles_too_slowly_is_refused_and_the_engine_serves_on(
    engine: BatchingEngine, tiny_model: Path
) -> None:
    """A length bound on a top-level string grows the automaton exponentially: the compile is killed
    at its limit."""
    slow = json.dumps({"type": "string", "maxLength": 64})
    grammars = Grammars(HFTokenizer(tiny_model).tokenizer, eos_token_id=2, vocab_size=320, timeout_s=1.0)
    with pytest.raises(InvalidArgument, match="did not compile within 1 s"):
        await grammars.index(slow)
    quick = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    first, second = await asyncio.gather(grammars.index(quick), grammars.index(quick))
    assert first is second  # one compile for both callers
    result = await collect(engine, request("after", prompts(1, [6])[0], max_tokens=30, json_schema=quick))
    assert json.loads(result.text) in ({"ok": True}, {"ok": False})


async def test_the_grammar_outranks_shaping_that_excludes_every_allowed_token(engine: BatchingEngine) -> None:
    """`min_tokens` bans the stop tokens, and the grammar allows only those: the grammar's tokens stay
    (the request is not left with no candidate, and the engine serves on)."""
    first_letters = (16 + ord("t"), 16 + ord("f"))  # the tiny tokenizer's byte tokens
    prompt = prompts(1, [9], seed=19)[0]
    boolean = json.dumps({"type": "boolean"})
    shaped = request("gs", prompt, max_tokens=8, json_schema=boolean, stop_token_ids=first_letters, min_tokens=3)
    result = await collect(engine, shaped)
    assert result.tokens[0] in first_letters and result.finish is Finish.STOP
    after = await collect(engine, request("gs-after", prompt, max_tokens=8, json_schema=boolean))
    assert json.loads(after.text) in (True, False)


@pytest.mark.parametrize("ignore_eos", [True, False])
async def test_end_of_sequence_where_the_grammar_allows_it_ends_the_request(
    engine: BatchingEngine, ignore_eos: bool
) -> None:
    """An integer is a complete match after its first digit yet may go on: end-of-sequence is one of
    the allowed tokens there, and choosing it (pushed by a bias) ends the request with that match."""
    prompt = prompts(1, [12], seed=20)[0]
    integer = json.dumps({"type": "integer"})
    eos = 2
    ended = await collect(
        engine,
        request("ge", prompt, max_tokens=20, json_schema=integer, logit_bias=((eos, 100.0),), ignore_eos=ignore_eos),
    )
    assert ended.finish is Finish.STOP and ended.tokens[-1] == eos
    assert isinstance(json.loads(ended.text), int)
    after = await collect(engine, request("ge-after", prompt, max_tokens=8))
    assert after.finish is Finish.LENGTH  # the engine serves on
