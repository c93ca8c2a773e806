"""Content-addressed compile cache (modelled on CuPy's kernel cache).

An entry is one compiled module: its artifact bytes, its kernel entries and, optionally, its
generated source. The key hashes every input that affects those bytes (see `module_key`). Writes
go to a temporary file that is renamed into place, so readers never see half an entry and
concurrent builds may share a cache; an entry that fails its checksum counts as a miss.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass

from . import __version__
from .runtime.archive import cache_home

LAYOUT = "v1"   # bump when the entry format changes
_MAGIC = b"FBC1"


def default_dir() -> str:
    return os.path.join(cache_home(), "modules")


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """sha256 of fusebuild's own source: codegen templates and compiler flags live there, so any
    change to them (released or not) gives new keys."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256(__version__.encode())
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def module_key(group_json: dict, keys: list[str], target: str, toolchain: dict) -> str:
    """sha256 of everything that determines a module's bytes: the group's IR, its ArgSpecs,
    the target, the toolchain versions (compilers, linker) and fusebuild's code."""
    payload = {"fusebuild": code_fingerprint(), "group": group_json, "keys": sorted(keys),
               "target": target, "toolchain": dict(sorted(toolchain.items()))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class Entry:
    artifacts: dict[str, bytes]       # relative path in the bundle -> bytes
    kernels: list[dict]               # manifest kernel entries


class Cache:
    def __init__(self, root: str | None):
        self.root = root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, LAYOUT, key[:2], key)

    def get(self, key: str) -> Entry | None:
        """The entry, or None if absent, truncated or corrupt."""
        if self.root is None:
            return None
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
        except OSError:
            return None
        try:
            if data[:4] != _MAGIC:
                return None
            (meta_len,) = struct.unpack_from("<Q", data, 4)
            meta = json.loads(data[12:12 + meta_len])
            blob = data[12 + meta_len:]
            if hashlib.sha256(blob).hexdigest() != meta["sha256"] or len(blob) != meta["size"]:
                return None
            artifacts, pos = {}, 0
            for rel, size in meta["files"]:
                artifacts[rel] = blob[pos:pos + size]
                pos += size
            return Entry(artifacts, meta["kernels"])
        except (ValueError, KeyError, struct.error, TypeError):
            return None

    def put(self, key: str, entry: Entry) -> None:
        """Store atomically; failures to write are ignored (the cache is an optimization)."""
        if self.root is None:
            return
        files = sorted(entry.artifacts.items())
        blob = b"".join(data for _, data in files)
        meta = json.dumps({"files": [[rel, len(data)] for rel, data in files],
                           "kernels": entry.kernels, "size": len(blob),
                           "sha256": hashlib.sha256(blob).hexdigest()}).encode()
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + struct.pack("<Q", len(meta)) + meta + blob)
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass
