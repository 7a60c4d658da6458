"""Structured output: the tokens a request may take next under its JSON schema.

A schema becomes a regular expression and then an index over the model's
vocabulary (outlines-core, on the CPU): for each state of the expression's
automaton, the token ids that keep the output a prefix of a match. Each
request with a schema carries a `Constraint` (its automaton state); the sampler
masks every other token, and the request ends when the output is a complete
match that nothing can extend (only end-of-sequence is left).

Compiling is the costly part, and a hostile schema can make it unbounded (a
length bound on a top-level string grows the automaton exponentially:
`maxLength: 16` takes seconds, 32 does not finish). So a schema is compiled in
a child process that is killed after `COMPILE_TIMEOUT_S`, off the event loop,
and refused with a 400 if it takes longer. Indexes are cached per schema text
(bounded), as agents send the same schemas again and again.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import OrderedDict
from collections.abc import Iterable
from multiprocessing.connection import Connection

from outlines_core import Guide, Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema
from tokenizers import Tokenizer

from shared.errors import InvalidArgument
from shared.openai.tokens import TokenPieces

CACHED_SCHEMAS = 64
COMPILE_TIMEOUT_S = 10.0


class Constraint:
    """One request's place in its grammar: the tokens allowed next."""

    __slots__ = ("_eos", "_guide", "allowed")

    def __init__(self, guide: Guide, eos_token_id: int) -> None:
        self._guide = guide
        self._eos = eos_token_id
        self.allowed: list[int] = list(guide.get_tokens())

    def advance(self, token: int) -> None:
        if token == self._eos:
            # Allowed only where the output is a complete match; the automaton has no move for it.
            self.allowed = [self._eos]
            return
        try:
            self.allowed = list(self._guide.advance(token))
        except ValueError:  # a token the mask did not allow: end the request, not the engine
            self.allowed = []

    @property
    def complete(self) -> bool:
        """The output matches and nothing can extend it (or this vocabulary cannot)."""
        return not self.allowed or self.allowed == [self._eos]


class Grammars:
    """JSON-schema indexes over one tokenizer's vocabulary."""

    def __init__(
        self, tokenizer: Tokenizer, eos_token_id: int, vocab_size: int, timeout_s: float = COMPILE_TIMEOUT_S
    ) -> None:
        self._tokenizer = tokenizer
        self._eos = eos_token_id
        self._vocab_size = vocab_size  # the model's logits: a tokenizer may name more ids than it has
        self._timeout_s = timeout_s
        self._vocabulary: Vocabulary | None = None
        self._indexes: OrderedDict[str, Index] = OrderedDict()
        self._compiling: dict[str, asyncio.Task[Index]] = {}

    async def index(self, schema: str) -> Index:
        """The compiled schema: from the cache, from a compile already under way, or compiled now.

        The compile is a task of its own, so a caller that goes away cancels neither it nor the
        other callers waiting on the same schema.
        """
        index = self._indexes.get(schema)
        if index is not None:
            self._indexes.move_to_end(schema)
            return index
        task = self._compiling.get(schema)
        if task is None:
            task = self._compiling[schema] = asyncio.create_task(self._compile(schema))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(task)

    async def _compile(self, schema: str) -> Index:
        try:
            index = await asyncio.to_thread(lambda: compile_schema(schema, self._vocab(), self._timeout_s))
        finally:
            del self._compiling[schema]
        self._indexes[schema] = index
        if len(self._indexes) > CACHED_SCHEMAS:
            self._indexes.popitem(last=False)
        return index

    def constraint(self, index: Index, resumed: Iterable[int]) -> Constraint:
        """A fresh constraint on `index`, advanced past the tokens a resumed request already has."""
        constraint = Constraint(Guide(index), self._eos)
        if not constraint.allowed:
            raise InvalidArgument(
                "no token of this model can begin output the JSON schema allows", param="response_format"
            )
        for token in resumed:
            if token not in constraint.allowed:
                raise InvalidArgument(
                    "resume_token_ids do not follow the request's JSON schema", param="resume_token_ids"
                )
            constraint.advance(token)
        return constraint

    def _vocab(self) -> Vocabulary:
        """Every token's exact bytes, special tokens left out (their text is not output text)."""
        if self._vocabulary is None:
            special = {i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
            pieces = TokenPieces(self._tokenizer)
            by_bytes: dict[bytes, list[int]] = {}
            for token_id in range(min(self._tokenizer.get_vocab_size(), self._vocab_size)):
                raw = bytes(pieces.piece(token_id)[1])
                if token_id != self._eos and token_id not in special and raw:
                    by_bytes.setdefault(raw, []).append(token_id)
            self._vocabulary = Vocabulary(self._eos, by_bytes)
        return self._vocabulary


def compile_schema(schema: str, vocabulary: Vocabulary, timeout_s: float) -> Index:
    """Compile in a child process, killed after `timeout_s` (blocking: call it on a thread).

    A spawned child, not a forked one: the worker has threads (the engine's, gRPC's) that a fork
    would copy mid-flight.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_compile_child, args=(schema, vocabulary, sender), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise InvalidArgument(
                f"the JSON schema did not compile within {timeout_s:g} s (some length bounds on strings make "
                "automata that grow exponentially)",
                param="response_format",
            )
        compiled, result = receiver.recv()
    except EOFError:
        raise InvalidArgument("the JSON schema compiler failed on this schema", param="response_format") from None
    finally:
        child.kill()
        child.join()
        receiver.close()
    if not compiled:
        raise InvalidArgument(f"the JSON schema cannot be compiled: {result}", param="response_format")
    assert isinstance(result, Index)
    return result


def _compile_child(schema: str, vocabulary: Vocabulary, sender: Connection) -> None:
    try:
        sender.send((True, Index(build_regex_from_schema(schema), vocabulary)))
    except BaseException as exc:  # outlines-core's Rust panics derive from BaseException
        sender.send((False, str(exc)[:500]))
    finally:
        sender.close()
