"""Wording shared by the build side and the runtime (a leaf module)."""
from __future__ import annotations


def plural(n: int, noun: str, many: str = "") -> str:
    """'1 group', '2 groups' ('1 entry', '3 entries' with `many`)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"



def backward_groups(names) -> int:
    """How many of the group `names` are backward groups (`<g>__grad` beside `g`, derived from
    `grad:`)."""
    from .abi import GRAD_SUFFIX
    names = set(names)
    return sum(1 for n in names if n.endswith(GRAD_SUFFIX) and n[:-len(GRAD_SUFFIX)] in names)


def groups_phrase(names) -> str:
    """'25 groups + 11 backward': the groups a spec declares, the backward ones counted apart."""
    names = set(names)
    backward = backward_groups(names)
    return plural(len(names) - backward, "group") + (f" + {backward} backward" if backward else "")
