"""The aarch64 side of tests/test_aarch64_emulated.py, run by an arm64 python3.11 under qemu-user:
load the bundle with `fusebuild.runtime.load`, make every call of the case file twice (the first
on the Python path, the repeat on the C fast path) and once more on the Python path, and write
what it saw: the levels the runtime selected, the SVE vector length, the outputs' bytes, and
the error for a FUSEBUILD_CPU_ISA of the other family.

    runner.py BUNDLE CASES_DIR OUT_DIR      (case format: tests/aarch64/harness.py)

Imports only the standard library, numpy and fusebuild.runtime (the root has nothing else).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys

import numpy as np

from fusebuild import dtypes as dt, runtime
from fusebuild.runtime import cpu

PR_SVE_GET_VL, PR_SVE_VL_LEN_MASK = 51, 0xFFFF


def sve_vector_bits() -> int | None:
    """The SVE vector length of this thread in bits (prctl), None without SVE."""
    vl = ctypes.CDLL(None, use_errno=True).prctl(PR_SVE_GET_VL, 0, 0, 0, 0)
    return None if vl < 0 else (vl & PR_SVE_VL_LEN_MASK) * 8


def tensor(desc: dict, blob: bytes) -> np.ndarray:
    """An array with the recorded dtype, shape and byte strides over a copy of its bytes."""
    data = bytearray(blob[desc["at"]:desc["at"] + desc["nbytes"]]) or bytearray(1)
    return np.ndarray(tuple(desc["shape"]), dt.lookup(desc["dtype"]).numpy, buffer=data,
                      strides=tuple(desc["strides"]))


def run_case(bundle, case: dict, blob: bytes, out: bytearray) -> dict:
    args = [tensor(a["tensor"], blob) if "tensor" in a else a["scalar"] for a in case["args"]]
    kw = {"seed": case["seed"], "offset": case["offset"]} if case["seed"] is not None else {}
    caller = bundle[case["group"]]
    try:
        got = caller(*args, **kw)
    except runtime.KernelNotFound as e:
        return {"missing": str(e)}
    except Exception as e:  # noqa: BLE001 - reported per case; the other cases still run
        return {"error": f"{type(e).__name__}: {e}"}
    again = caller(*args, **kw)
    slow = caller._call(tuple(args), None, case["seed"], case["offset"])
    got, again, slow = ((r if isinstance(r, tuple) else (r,)) for r in (got, again, slow))
    outputs = []
    for x in got:
        outputs.append({"dtype": dt.from_numpy(x.dtype).name, "shape": list(x.shape),
                        "at": len(out), "nbytes": x.nbytes})
        out += x.tobytes()
    return {"outputs": outputs, "key": caller.key(*args),
            "paths_agree": all(x.tobytes() == y.tobytes() == z.tobytes()
                               for x, y, z in zip(got, again, slow))}


def main(bundle_path: str, cases_dir: str, out_dir: str) -> None:
    report = {"features": sorted(cpu.hwcap_features(*cpu.hwcap_words())),
              "vector_bits": sve_vector_bits()}
    try:
        report["isas"] = list(cpu.host_isas())
    except runtime.BundleError as e:
        report["isa_error"] = str(e)
    else:
        with open(os.path.join(cases_dir, "cases.json"), encoding="utf-8") as f:
            cases = json.load(f)
        with open(os.path.join(cases_dir, "cases.bin"), "rb") as f:
            blob = f.read()
        bundle = runtime.load(bundle_path)
        out = bytearray()
        report["cases"] = [run_case(bundle, case, blob, out) for case in cases]
        report["loaded"] = sorted(bundle._libs._libs)      # the shared objects that ran
        with open(os.path.join(out_dir, "outputs.bin"), "wb") as f:
            f.write(out)
    os.environ["FUSEBUILD_CPU_ISA"] = "x86-64-v3"        # a level of the other family
    try:
        cpu.host_isas()
    except runtime.BundleError as e:
        report["foreign_cap_error"] = str(e)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
