"""On-the-fly compilation of a missing kernel (runtime `on_miss="jit"`).

The runtime runs `python -m fusebuild.jit` with a JSON request on stdin, so compilers never load
into the serving process; the module goes through the normal compile cache and the shared object
is written (atomically) into the directory the request names.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

from . import build, ir
from .argspec import parse_key
from .cache import Cache, Entry, default_dir, module_key
from .errors import FusebuildError
from .spec import Variant


def compile_missing(group_json: dict, key: str, target: str, out_dir: str) -> dict:
    """Compile `key` of the group for `target`; the manifest-style entry, with an absolute file."""
    group = ir.group_from_json(group_json)
    variants = (Variant(key, tuple(d for d, _ in parse_key(key)[1])),)
    toolchain = build.backend_versions({"cpu"})
    cache = Cache(default_dir())
    ckey = module_key(group.ir_json(), [key], target, toolchain)
    entry = cache.get(ckey)
    if entry is None:
        result = build.run_job(build.Job(group, variants, "cpu", (target,)))
        if result.error:
            raise FusebuildError(result.error)
        entry = Entry(result.artifacts, result.kernels)
        cache.put(ckey, entry)
    (rel, data), = entry.artifacts.items()
    path = os.path.join(out_dir, hashlib.sha256(data).hexdigest()[:24] + ".so")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".jit-", dir=out_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return {**entry.kernels[0], "file": path}


def main() -> int:
    req = json.load(sys.stdin)
    try:
        out = compile_missing(req["group"], req["key"], req["target"], req["out_dir"])
        json.dump({"entry": out}, sys.stdout)
        return 0
    except FusebuildError as e:
        json.dump({"error": str(e)}, sys.stdout)
        return 1


if __name__ == "__main__":
    sys.exit(main())
