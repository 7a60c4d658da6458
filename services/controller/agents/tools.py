"""Registered tools (run by the Celery worker) and retrievers (run by the controller) for graph steps.

A tool takes its rendered string arguments and returns text; raising fails
the attempt (the runner retries within the step's limit). Each call runs in a
process of its own (sandbox.py), so a timeout or a cancel stops it. A retriever takes
a query and top_k and returns passages. Both are plain functions registered
here by name; the names are what graph specs may use.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ToolFunction = Callable[[dict[str, str]], str]
Retriever = Callable[[str, int], list[str]]

_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculator(args: dict[str, str]) -> str:
    """Arithmetic on numbers (+ - * / ** and parentheses) from `expression`; nothing else is evaluated."""

    def evaluate(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            # Each side once: evaluating an operand twice (to check an exponent, say) is exponential in a chain.
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    expression = args.get("expression", "")
    if len(expression) > 500:
        raise ValueError("expression longer than 500 characters")
    value = evaluate(ast.parse(expression, mode="eval").body)
    return f"{value:g}"


def word_count(args: dict[str, str]) -> str:
    """Words in `text`."""
    return str(len(args.get("text", "").split()))


def always_fails(args: dict[str, str]) -> str:
    """Raises every time: a diagnostic for retry and failure handling."""
    raise RuntimeError(args.get("message", "this tool always fails"))


def spin(args: dict[str, str]) -> str:
    """Keeps a core busy for `seconds` (at most 3600), then returns them: a diagnostic for timeouts and
    cancellation (a call that was stopped stops using the CPU)."""
    seconds = min(3600.0, float(args.get("seconds", "1")))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return f"{seconds:g}"


TOOLS: dict[str, ToolFunction] = {
    "calculator": calculator,
    "word-count": word_count,
    "always-fails": always_fails,
    "spin": spin,
}


@functools.cache
def _passages() -> list[str]:
    root = Path(__file__).resolve().parents[3] / "docs"
    passages = []
    for path in sorted(root.glob("*.md")):
        passages += [p.strip() for p in path.read_text().split("\n\n") if len(p.strip()) > 80]
    return passages


PASSAGE_CHARS = 400


def _terms(text: str) -> list[str]:
    """Lower-case words of three letters or more, plurals folded ("pools" -> "pool")."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words if len(w) > 2]


@functools.cache
def _index() -> tuple[list[Counter[str]], dict[str, int], float]:
    """Term counts per passage, passages per term, mean passage length (in terms)."""
    counts = [Counter(_terms(passage)) for passage in _passages()]
    frequency: Counter[str] = Counter()
    for terms in counts:
        frequency.update(terms.keys())
    return counts, dict(frequency), sum(sum(c.values()) for c in counts) / max(1, len(counts))


BM25_K1, BM25_B = 1.2, 0.75


def docs(query: str, top_k: int) -> list[str]:
    """Paragraphs of Shoal's own documentation ranked by BM25 for the query (rare words weigh more, long
    paragraphs do not win by length), cut to their first PASSAGE_CHARS characters (snippets that fit small
    models' contexts)."""
    counts, frequency, mean_length = _index()
    total = len(counts)
    idf = {t: math.log(1 + (total - frequency.get(t, 0) + 0.5) / (frequency.get(t, 0) + 0.5)) for t in _terms(query)}
    scored = []
    for index, terms in enumerate(counts):
        norm = BM25_K1 * (1 - BM25_B + BM25_B * sum(terms.values()) / mean_length)
        score = sum(weight * terms[t] * (BM25_K1 + 1) / (terms[t] + norm) for t, weight in idf.items() if terms[t])
        if score > 0:
            scored.append((-score, index))
    return [_passages()[index][:PASSAGE_CHARS] for _, index in sorted(scored)[:top_k]]


RETRIEVERS: dict[str, Retriever] = {"docs": docs}
