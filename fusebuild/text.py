"""Wording shared by the build side and the runtime (a leaf module)."""
from __future__ import annotations


def plural(n: int, noun: str, many: str = "") -> str:
    """'1 group', '2 groups' ('1 entry', '3 entries' with `many`)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"
