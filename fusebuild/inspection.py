"""`fusebuild inspect`: the kernels of a bundle, and the generated source of one of them."""
from __future__ import annotations

from . import ir, syntax
from . import targets as tg
from .argspec import parse_key
from .codegen.common import KernelSource
from .errors import BundleError
from .runtime.dispatch import nearest_keys


def kernel_rows(manifest: dict) -> list[tuple[str, str, str, int]]:
    """(group, key, target, artifact size) per kernel, in manifest order."""
    return [(k["group"], k["key"], k["target"], manifest["artifacts"][k["file"]]["size"])
            for k in manifest["kernels"]]


def format_table(rows: list[tuple], head: tuple = ("group", "key", "target", "bytes")) -> str:
    cols = list(zip(head, *rows))
    widths = [max(len(str(v)) for v in col) for col in cols]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)


def kernel_source(manifest: dict, key: str, target: str | None = None) -> str:
    """The source the build generated for `key` (regenerated from the manifest's IR)."""
    entries = [k for k in manifest["kernels"] if k["key"] == key and
               (target is None or k["target"] == target)]
    if not entries:
        have = sorted({k["key"] for k in manifest["kernels"] if target is None or
                       k["target"] == target})
        try:
            near = nearest_keys(key, have)
        except ValueError as e:
            raise BundleError(f"{e}; keys are written as listed by `fusebuild inspect BUNDLE`"
                              ) from None
        raise BundleError(f"the bundle has no kernel {key}" + (f" for {target}" if target else "")
                          + f"; nearest keys present: {', '.join(near) or 'none'}")
    group = syntax.group_from_json(manifest["groups"][entries[0]["group"]])
    names = [i.name for i in group.tensor_inputs]
    dtypes = {n: d for n, (d, _) in zip(names, parse_key(key)[1])}
    ks = KernelSource(ir.instantiate(group, dtypes), key)
    if tg.backend(entries[0]["target"]) == "cpu":
        from .codegen.cpu import render_group
        return render_group([ks])[0]
    from .codegen.cuda import render_module
    return render_module([ks])
