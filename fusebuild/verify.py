"""Checking a bundle: schema, format and hashes, every artifact this host can load, and with
`numerics` every CPU kernel against the reference evaluator rebuilt from the manifest's IR."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import numpy as np

from . import dtypes as dt
from . import elf, ir, syntax, reference
from . import targets as tg
from .artifact import check_description, describe, read_description
from .argspec import Canonical, contiguous_strides, parse_key, row_strides
from .codegen.common import KernelSource
from .errors import BundleError
from .text import plural
from .runtime import dispatch
from .runtime.archive import extract
from .runtime.cpu import FAMILY_NAMES, host_isas, load_verified
from .runtime.manifest import (group_ir, output_dtypes, read_artifact, read_manifest,
                               verify_artifacts)


@dataclass
class Report:
    root: str
    bundle_id: str
    artifacts: int = 0
    loaded: int = 0
    symbols: int = 0
    numerics: int = 0                                       # kernels run against the reference
    skipped: dict[str, int] = field(default_factory=dict)   # kernels not run, by reason
    foreign: dict[str, int] = field(default_factory=dict)   # shared objects of other families

    def summary(self) -> str:
        text = (f"ok: {self.root} (id {self.bundle_id}): {plural(self.artifacts, 'artifact')} "
                f"{_verb(self.artifacts, 'match')} their sha256, "
                f"{plural(self.symbols, 'kernel symbol')} present, "
                f"{plural(self.loaded, 'shared object')} loaded")
        for name, n in sorted(self.foreign.items()):
            text += f", {plural(n, 'shared object')} not loadable here ({name})"
        if self.numerics:
            text += (f", {plural(self.numerics, 'CPU kernel')} {_verb(self.numerics, 'match')} "
                     "the reference")
        return text + self.skip_note()

    def skip_note(self) -> str:
        if not self.skipped:
            return ""
        reasons = "; ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"; numerics skipped for {plural(sum(self.skipped.values()), 'kernel')} ({reasons})"


def _verb(n: int, verb: str) -> str:
    return verb + "es" if n == 1 else verb


def open_root(path: str) -> str:
    if os.path.isfile(path) and path.endswith((".tar.gz", ".tgz")):
        return extract(path)
    return os.path.abspath(path)


def check_schema(manifest: dict) -> dict[str, syntax.Group]:
    """Every group parses back to its own JSON and every kernel's target and output dtypes are
    those of its group's IR (`read_manifest` checked files, hashes and symbols); returns the
    groups."""
    groups = {name: group_ir(g) for name, g in manifest["groups"].items()}
    derived: dict[str, list[str]] = {}
    for k in manifest["kernels"]:
        where = f"kernel {k['key']} [{k['target']}]"
        try:
            tg.expand([k["target"]])
        except ValueError as e:
            raise BundleError(f"{where} of the manifest is invalid: {e}") from None
        if k["key"] not in derived:
            derived[k["key"]] = [d.name for d in output_dtypes(groups[k["group"]], k["key"])]
        if k["outputs"] != derived[k["key"]]:
            raise BundleError(f"{where} records outputs {', '.join(k['outputs'])} where its group "
                              f"computes {', '.join(derived[k['key']])}")
    return groups


_MACHINES = {"x86_64": elf.EM_X86_64, "aarch64": elf.EM_AARCH64}   # ELF e_machine per family


def _check_artifact(root: str, rel: str, kernels: list[dict], host: tuple[str, ...],
                    groups: dict[str, syntax.Group]) -> ctypes.CDLL | None:
    """ELF checks for one artifact and its description against the manifest's; loads it when
    this host can. Returns the loaded library, or None."""
    data = read_artifact(root, rel, kernels[0]["sha256"])
    target = kernels[0]["target"]
    symbols = {k["symbol"] for k in kernels}
    if rel.endswith(".ptx"):
        missing = {s for s in symbols if f".entry {s}(".encode() not in data}
    else:
        try:
            elf.check_bounds(data)
            machine = elf.header(data)[0]
            if tg.backend(target) == "cpu":
                family = tg.family(tg.arch(target))
                if machine != _MACHINES[family]:
                    raise ValueError(f"e_machine {machine} is not {FAMILY_NAMES[family]} "
                                     f"({_MACHINES[family]}), as {target} needs")
            if tg.backend(target) == "cuda" and elf.cubin_sm(data) != \
                    int(tg.arch(target)[3:].rstrip("a")):
                raise ValueError(f"it is for sm_{elf.cubin_sm(data)}, not {tg.arch(target)}")
        except ValueError as e:
            raise BundleError(f"{rel}: {e}") from None
        missing = symbols - elf.functions(data)
    if missing:
        raise BundleError(f"{rel} does not export {', '.join(sorted(missing))}")
    expected = describe(groups[kernels[0]["group"]], [k["key"] for k in kernels], target)
    check_description(read_description(data, rel), rel, expected)
    if tg.backend(target) == "cpu" and tg.arch(target) in host:
        lib = load_verified(root, rel, kernels[0]["sha256"], expected)
        try:
            for s in symbols:
                lib[s]
        except AttributeError as e:
            raise BundleError(f"{rel} does not load: {e}") from None
        return lib
    return None


ROW_LENGTHS = (37, 300, 0)   # row lengths N reduction kernels are checked at (0: empty rows)


def _strided_view(d: dt.DType, sizes: tuple, letters: str, rng) -> np.ndarray:
    """A random array of `sizes` whose strides follow `letters` (c dense, b 0, s gapped)."""
    dense = contiguous_strides(sizes)
    strides = [0 if c == "b" else dense[i] * 2 + (i == len(sizes) - 1) if c == "s" else dense[i]
               for i, c in enumerate(letters)]
    n = max(1, 1 + sum((s - 1) * st for s, st in zip(sizes, strides)))
    base = np.ascontiguousarray(
        (rng.standard_normal(n) * 2).astype(d.numpy) if d.is_float else
        rng.random(n) < 0.5 if d.is_bool else
        rng.integers(*_int_range(d), size=n).astype(d.numpy))
    return np.lib.stride_tricks.as_strided(base, sizes, [s * base.itemsize for s in strides])


def _int_range(d: dt.DType) -> tuple[int, int]:
    lo, hi = ir.int_range(d)
    return max(lo, -1000), min(hi, 1000) + 1


def check_numerics(lib: ctypes.CDLL, group: syntax.Group, entry: dict,
                   rng: np.random.Generator) -> None:
    """Run one CPU kernel (of `lib`, its loaded shared object) on random inputs of its key's
    layout and compare with the reference; a reduction kernel once per row length of
    ROW_LENGTHS."""
    _, descs = parse_key(entry["key"])
    dtypes = {i.name: d for i, (d, _) in zip(group.tensor_inputs, descs)}
    ks = KernelSource(ir.instantiate(group, dtypes), entry["key"])
    sizes = tuple(int(x) for x in rng.integers(2, 7, ks.rank))
    for n_row in ROW_LENGTHS if ks.kernel.reduce else (None,):
        _check_call(lib, group, entry, ks, dtypes,
                    sizes if n_row is None else sizes[:-1] + (n_row,), rng)


def _check_call(lib: ctypes.CDLL, group: syntax.Group, entry: dict, ks: KernelSource, dtypes: dict,
                sizes: tuple, rng: np.random.Generator) -> None:
    """One call over canonical `sizes`, split in two at a random index (inside a row of a
    reduction kernel: its row rule, abi.py, computes each row once)."""
    abi, reduces, descs = ks.abi, ks.kernel.reduce, parse_key(ks.key)[1]
    views = [[_strided_view(d, sizes, lay, rng) for _ in range(abi.chunks[i])]
             for i, (d, lay) in enumerate(descs)]
    scalars = [float(rng.uniform(0.05, 0.95)) if s.dtype.is_float else int(rng.integers(-50, 50))
               for s in group.scalar_inputs]
    bits = [dispatch._scalar_bits(s.name, v, s.dtype) for s, v in zip(group.scalar_inputs, scalars)]
    rows = [o.row for o in group.outputs]
    outs = [[np.empty(sizes[:-1] + (1,) if row else sizes, dt.lookup(o).numpy) for _ in range(n)]
            for o, n, row in zip(entry["outputs"], abi.parts, rows)]
    strides = [tuple(st // v[0].itemsize for st in v[0].strides) for v in views] + \
        [row_strides(sizes) if row else contiguous_strides(sizes) for row in rows]
    canon = Canonical(sizes, tuple(strides), tuple(lay for _, lay in descs))
    call = dispatch.Call([], [], [], bits, sizes, [], [], canon, entry["key"])
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**32))
    meta = dispatch.meta_words(call, abi, seed, offset)
    ptrs = np.array([v.__array_interface__["data"][0] for vs in views for v in vs] +
                    [o.ctypes.data for os_ in outs for o in os_], np.int64)
    fn = lib[entry["symbol"]]
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    n = dispatch.work_count(call, reduces)
    split = int(rng.integers(0, n + 1))
    for start, stop in ((0, split), (split, n)):
        fn(ptrs.ctypes.data, meta.ctypes.data, start, stop)
    want = reference.evaluate_views(ir.instantiate(group, dtypes, expand=False), views, scalars,
                                    seed, offset)
    n_row = sizes[-1] if reduces else 0
    for o, parts in zip(group.outputs, outs):
        magnitude = want.magnitude[o.name] if o.row else want.part_magnitude
        for k, part in enumerate(parts):
            m = reference.compare(part, want.parts[o.name][k], magnitude, n_row=n_row)
            if m:
                where = f" (rows of N = {n_row})" if reduces else ""
                raise BundleError(f"{entry['key']} [{entry['target']}] output {o.name}{where}: "
                                  f"{m.message}")


def verify(path: str, numerics: bool = False, seed: int = 0, allow_skip: bool = False) -> Report:
    """Check the bundle at `path` (a directory or archive); with `numerics`, also run every CPU
    kernel this host can load against the reference. Raises BundleError on any failure, and
    when `numerics` checked no kernel at all unless `allow_skip`."""
    root = open_root(path)
    manifest = read_manifest(root)
    verify_artifacts(root, manifest)
    groups = check_schema(manifest)
    report = Report(root, manifest["id"], artifacts=len(manifest["artifacts"]))
    by_file: dict[str, list[dict]] = {}
    for k in manifest["kernels"]:
        by_file.setdefault(k["file"], []).append(k)
    host = host_isas()
    libs: dict[str, ctypes.CDLL] = {}
    for rel, kernels in sorted(by_file.items()):
        lib = _check_artifact(root, rel, kernels, host, groups)
        if lib is not None:
            libs[rel] = lib
        report.symbols += len(kernels)
        target = kernels[0]["target"]
        if tg.backend(target) == "cpu" and tg.family(tg.arch(target)) != tg.host_family():
            name = FAMILY_NAMES[tg.family(tg.arch(target))]
            report.foreign[name] = report.foreign.get(name, 0) + 1
    report.loaded = len(libs)
    if numerics:
        rng = np.random.default_rng(seed)
        for k in manifest["kernels"]:
            why = _skip_reason(k["target"], host)
            if why:
                report.skipped[why] = report.skipped.get(why, 0) + 1
            else:
                check_numerics(libs[k["file"]], groups[k["group"]], k, rng)
                report.numerics += 1
        if not report.numerics and not allow_skip:
            raise BundleError(f"{root}: --numerics checked no kernel{report.skip_note()}; run it "
                              "on a host that can, or pass --allow-skip to accept this")
    return report


def _skip_reason(target: str, host: tuple[str, ...]) -> str:
    """Why verify --numerics cannot run a kernel of `target` here ('' if it can)."""
    if tg.backend(target) != "cpu":
        return f"{tg.backend(target).upper()}: numerics are checked on CPU kernels only"
    family = tg.family(tg.arch(target))
    if family != tg.host_family():
        return (f"{FAMILY_NAMES[family]}: not runnable on this "
                f"{FAMILY_NAMES[tg.host_family()]} host")
    if tg.arch(target) not in host:
        return (f"{tg.arch(target)}: this host runs only {', '.join(host)}" if host
                else f"{tg.arch(target)}: this host runs no {FAMILY_NAMES[family]} ISA level")
    return ""
