"""Recursive algorithms over deep trees without Python recursion.

A body of 1,000 chained operators is a legitimate input: a step written as a generator that
`yield`s each child and receives the child's result runs here on a heap stack, so tree depth is
bounded by memory, not by the interpreter's recursion limit.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

Step = Callable[[Any], Generator[Any, Any, Any]]


def trampoline(step: Step, root: Any) -> Any:
    """`step(root)`'s return value, where `result = yield child` stands for `step(child)`."""
    stack = [step(root)]
    result = None
    while stack:
        try:
            child = stack[-1].send(result)
        except StopIteration as done:
            stack.pop()
            result = done.value
            continue
        stack.append(step(child))
        result = None
    return result
