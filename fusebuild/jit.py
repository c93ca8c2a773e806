"""On-the-fly compilation of a missing kernel (runtime `on_miss="jit"`), CPU or CUDA.

The runtime runs `python -m fusebuild.jit` with a JSON request on stdin, so compilers never load
into the serving process; the module goes through the normal compile cache and the artifact
(a CPU shared object or a cubin) is written (atomically) into the directory the request names.
The reply is {"entry": ...} or {"error": ..., "kind": "type" | "extras" | "build"}: the group
does not type-check for the key's dtypes, the build extras are missing, or the compile failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

from .errors import FusebuildError, SpecError


def compile_missing(group_json: dict, key: str, target: str, out_dir: str) -> dict:
    """Compile `key` of the group for `target`; the manifest-style entry, with an absolute file.
    The build side is imported here, so that its absence is an answer ("extras"), not a crash."""
    from . import build, ir, syntax
    from . import targets as tg
    from .argspec import parse_key
    from .cache import Cache, Entry, default_dir, module_key
    from .spec import Variant
    group = syntax.group_from_json(group_json)
    dtypes = tuple(d for d, _ in parse_key(key)[1])
    ir.instantiate(group, {i.name: d for i, d in zip(group.tensor_inputs, dtypes)})
    backend = tg.backend(target)
    toolchain = build.toolchain_versions((target,))
    cache = Cache(default_dir())
    ckey = module_key(group.ir_json(), [key], target, toolchain)
    entry = cache.get(ckey)
    if entry is None:
        result = build.run_job(build.Job(group, (Variant(key, dtypes),), backend, (target,)))
        if result.error:
            raise FusebuildError(result.error)
        entry = Entry(result.artifacts, result.kernels)
        cache.put(ckey, entry)
    (rel, data), = entry.artifacts.items()
    path = os.path.join(out_dir, hashlib.sha256(data).hexdigest()[:24] + os.path.splitext(rel)[1])
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".jit-", dir=out_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return {**entry.kernels[0], "file": path}


def reply(req: dict) -> dict:
    """The answer to one request (never raises for an expected failure)."""
    try:
        return {"entry": compile_missing(req["group"], req["key"], req["target"], req["out_dir"])}
    except ImportError as e:
        return {"error": f"{type(e).__name__}: {e}", "kind": "extras"}
    except SpecError as e:
        return {"error": e.message + (f" ({e.hint})" if e.hint else ""), "kind": "type"}
    except FusebuildError as e:
        return {"error": str(e), "kind": "build"}


def main() -> int:
    out = reply(json.load(sys.stdin))
    json.dump(out, sys.stdout)
    return 0 if "entry" in out else 1


if __name__ == "__main__":
    sys.exit(main())
