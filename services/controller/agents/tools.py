"""Registered tools (run by the Celery worker) and retrievers (run by the controller) for graph steps.

A tool takes its rendered string arguments and returns text; raising fails
the attempt (the runner retries within the step's limit). A retriever takes
a query and top_k and returns passages. Both are plain functions registered
here by name; the names are what graph specs may use.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
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
            if isinstance(node.op, ast.Pow) and abs(evaluate(node.right)) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
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


TOOLS: dict[str, ToolFunction] = {
    "calculator": calculator,
    "word-count": word_count,
    "always-fails": always_fails,
}


@functools.cache
def _passages() -> list[str]:
    root = Path(__file__).resolve().parents[3] / "docs"
    passages = []
    for path in sorted(root.glob("*.md")):
        passages += [p.strip() for p in path.read_text().split("\n\n") if len(p.strip()) > 80]
    return passages


PASSAGE_CHARS = 400


def docs(query: str, top_k: int) -> list[str]:
    """Paragraphs of Shoal's own documentation ranked by the query's words they contain (their first
    PASSAGE_CHARS characters: snippets that fit small models' contexts)."""
    words = {w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 2}
    scored = []
    for index, passage in enumerate(_passages()):
        text = passage.lower()
        score = sum(text.count(w) for w in words)
        if score:
            scored.append((-score, index, passage))
    return [passage[:PASSAGE_CHARS] for _, _, passage in sorted(scored)[:top_k]]


RETRIEVERS: dict[str, Retriever] = {"docs": docs}
