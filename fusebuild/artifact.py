"""Self-describing artifacts (DESIGN §14): what each .so, cubin or PTX module computes.

The build embeds in every artifact, as the data object `abi.ARTIFACT_SYMBOL`, the canonical JSON
`describe` makes of its group's IR, keys and target: the group's name and IR hash (spec_hash),
the target level and, per kernel, its key, symbol and ABI shape (pointer and meta word counts,
chunks, cat parts, output dtypes and row outputs). `verify` recomputes it from the manifest
(`describe` again, on the manifest's group IR); `load` derives what it can from the manifest's
JSON without the IR (`implied`: the group JSON must hash to the spec_hash the artifact pins) and
takes the output dtypes and held sizes from the artifact. Both compare it with the bytes of the
artifact before any kernel of it runs, so an edited manifest cannot hand a kernel buffers or an
ISA level it was not built for. The description is read statically (ELF symbol, PTX initializer),
never by running the artifact. Used by the build and the runtime: imports no compiler.
"""
from __future__ import annotations

import json
import re
import struct
from typing import Iterable

from . import elf
from .abi import ARTIFACT_SYMBOL, Abi
from .argspec import parse_key, symbol_name
from .errors import BundleError, SpecError

FORMAT = 1          # of the description
_PTX = re.compile(rb"\.global\s+\.align\s+1\s+\.b8\s+" + ARTIFACT_SYMBOL.encode() +
                  rb"\[(\d+)\]\s*=\s*\{([\d,\s]*)\};")


def describe(group, keys: Iterable[str], target: str) -> bytes:
    """The description of the artifact holding kernels `keys` of `group` (a `syntax.Group`) for
    `target`; a pure function of them (no paths, times or host)."""
    from . import ir
    from .codegen.common import KernelSource
    names = [i.name for i in group.tensor_inputs]
    kernels = []
    for key in sorted(keys):
        try:
            ks = KernelSource(ir.instantiate(group, dict(zip(names, (d for d, _ in
                                                                     parse_key(key)[1])))), key)
        except SpecError as e:
            raise BundleError(f"kernel {key}: group {group.name} does not type-check for its "
                              f"dtypes: {e}") from None
        kernels.append(_kernel(key, ks.abi, [(o.dtype.name, o.row) for o in ks.kernel.outputs],
                               _held(ks) if target.startswith("cuda:") else None))
    return _description(group.name, group.spec_hash, target, kernels)


def implied(group: dict, kernels: Iterable[tuple[str, tuple[str, ...]]], target: str,
            found: bytes) -> bytes:
    """The description the manifest implies for the artifact of `target` holding `kernels`
    ((key, output dtype names) of its entries) of `group` (its manifest JSON), read from the
    JSON alone, without the IR: the artifact must embed exactly this. The group's JSON must
    hash to its spec_hash (which the artifact pins); the ABI follows from its inputs, outputs
    and the keys. The bytes of shared memory a CUDA kernel holds (`held`) are not in the
    manifest: they are taken from `found`, the artifact's own description, as what its code
    was built with."""
    from .runtime.manifest import group_hash
    if group_hash(group) != group.get("spec_hash"):
        raise BundleError(f"group {group.get('name')} of the manifest does not match its own "
                          "body (inputs, outputs, chunks or hash edited)")
    tensors = [i for i in group["inputs"] if i["kind"] == "tensor"]
    chunks = tuple(i["chunk"][0] if i["chunk"] else 1 for i in tensors)
    parts = tuple(o["cat"][0] if o["cat"] else 1 for o in group["outputs"])
    rows = [bool(o.get("row", False)) for o in group["outputs"]]
    n_scalars = len(group["inputs"]) - len(tensors)
    cuda = target.startswith("cuda:")
    held = _held_of(found) if cuda else {}
    kernels = [_kernel(key, Abi(_rank(key), chunks, parts, bool(group["has_random"]), n_scalars),
                       list(zip(outputs, rows)), held.get(key, []) if cuda else None)
               for key, outputs in sorted(kernels)]
    return _description(group["name"], group["spec_hash"], target, kernels)


def _rank(key: str) -> int:
    """The rank of a key's layouts (0 without tensor inputs), as `KernelSource.rank`."""
    descs = parse_key(key)[1]
    return len(descs[0][1]) if descs else 0


def _held_of(found: bytes) -> dict[str, list[int]]:
    """The `held` itemsizes of each kernel of a description, by key; only well-formed lists
    (itemsizes 1, 2, 4 or 8): for any other, the comparison with the implied description says
    what differs."""
    try:
        held = {k["key"]: k["held"] for k in json.loads(found)["kernels"]}
    except (ValueError, TypeError, KeyError):
        return {}
    return {key: h for key, h in held.items() if isinstance(h, list) and
            all(type(b) is int and b in (1, 2, 4, 8) for b in h)}


def _kernel(key: str, abi: Abi, outputs: list[tuple[str, bool]], held: list | None) -> dict:
    """The description of one kernel: its key, symbol and ABI shape."""
    return {"key": key, "symbol": symbol_name(key), "pointers": abi.n_ptrs, "meta": abi.n_meta,
            "chunks": list(abi.chunks), "parts": list(abi.parts),
            "outputs": [{"dtype": d, "row": row} for d, row in outputs],
            **({"held": held} if held is not None else {})}


def _description(group: str, spec_hash: str, target: str, kernels: list[dict]) -> bytes:
    from .runtime.manifest import canonical_json
    return canonical_json({"format": FORMAT, "group": group, "ir": spec_hash, "target": target,
                           "kernels": kernels}).encode()


def output_dtypes(description: bytes, key: str) -> tuple[str, ...]:
    """The output dtype names of kernel `key` in a (checked) description."""
    return next(tuple(o["dtype"] for o in k["outputs"])
                for k in json.loads(description)["kernels"] if k["key"] == key)


def _held(ks) -> list[int]:
    """Bytes per element of each input a CUDA reduction kernel holds in dynamic shared memory
    on its HELD path: the host sizes that memory by them."""
    from .codegen.cuda import held_itemsizes
    return held_itemsizes(ks)


def read_description(data: bytes, rel: str) -> bytes:
    """The description embedded in the bytes `data` of artifact `rel` (an ELF shared object or
    cubin, or PTX text); BundleError if it has none."""
    try:
        if data[:4] == b"\x7fELF":
            found = elf.object_bytes(data, ARTIFACT_SYMBOL)
        else:
            m = _PTX.search(data)
            values = m.group(2).split(b",") if m else []
            found = bytes(int(v) for v in values) if m and len(values) == int(m.group(1)) \
                else None
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise BundleError(f"{rel}: its description ({ARTIFACT_SYMBOL}) cannot be read: "
                          f"{e}") from None
    if found is None:
        raise BundleError(f"{rel} carries no description ({ARTIFACT_SYMBOL}): it was not built "
                          "by this fusebuild; rebuild the bundle")
    return found


def check_description(found: bytes, rel: str, expected: bytes) -> None:
    """Refuse artifact `rel`, which embeds the description `found`, unless that is `expected`,
    the one the manifest implies; the BundleError says what differs."""
    if found != expected:
        raise BundleError(f"{rel} {_difference(found, expected)}: refused before any call")


def _difference(found: bytes, expected: bytes) -> str:
    """What differs between an artifact's description and the manifest's, in words."""
    try:
        got = json.loads(found)
        want = json.loads(expected)
        got_keys = [k["key"] for k in got["kernels"]]
    except (ValueError, TypeError, KeyError):
        return f"carries an unreadable description ({ARTIFACT_SYMBOL})"
    if got.get("format") != want["format"]:
        return (f"carries a description of format {got.get('format')!r}, this fusebuild writes "
                f"{want['format']}: rebuild the bundle")
    if got.get("target") != want["target"]:
        return (f"describes target {got.get('target')}, the manifest says {want['target']}: the "
                "artifact was moved or the manifest edited")
    if got.get("group") != want["group"]:
        return f"holds group {got.get('group')}, the manifest says {want['group']}"
    if got.get("ir") != want["ir"]:
        return (f"was built for group IR {str(got.get('ir'))[:12]} but the manifest's group "
                f"{want['group']} has {want['ir'][:12]}: the manifest's group was edited")
    want_keys = [k["key"] for k in want["kernels"]]
    if got_keys != want_keys:
        return (f"holds kernels {', '.join(got_keys)} where the manifest lists "
                f"{', '.join(want_keys)}")
    for g, w in zip(got["kernels"], want["kernels"]):
        if g != w and isinstance(g, dict) and {**g, "outputs": w["outputs"]} == w:
            return (f"kernel {w['key']}: the manifest records outputs "
                    f"{', '.join(o['dtype'] for o in w['outputs'])} where its group computes "
                    f"{_dtypes(g['outputs'])}")
        if g != w:
            return (f"kernel {w['key']} has the ABI {json.dumps(g, sort_keys=True)} where the "
                    f"manifest's group implies {json.dumps(w, sort_keys=True)}")
    return "carries a description that differs from the manifest's"


def _dtypes(outputs) -> str:
    """The output dtypes of a kernel's description, in words."""
    try:
        return ", ".join(str(o["dtype"]) for o in outputs)
    except (TypeError, KeyError):
        return json.dumps(outputs)
