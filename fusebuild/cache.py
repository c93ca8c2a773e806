"""Content-addressed compile cache (modelled on CuPy's kernel cache).

An entry is one compiled module: its artifact bytes, its kernel entries and, optionally, its
generated source. The key hashes every input that affects those bytes (see `module_key`). Writes
go to a temporary file that is renamed into place, so readers never see half an entry and
concurrent builds may share a cache. An entry's checksum covers its metadata (files, kernel
entries) and its bytes; one that fails it, or is not a regular file, counts as a miss.
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
from .errors import BundleError
from .runtime.archive import cache_home
from .runtime.manifest import MAX_ARTIFACT_BYTES, load_json, read_regular

LAYOUT = "v2"   # bump when the entry format changes
_MAGIC = b"FBC2"
_HEAD = struct.Struct("<4s32sQ")     # magic, sha256 of everything after the head, metadata length


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
            data = read_regular(*os.path.split(self._path(key)), limit=MAX_ARTIFACT_BYTES)
            magic, digest, meta_len = _HEAD.unpack_from(data)
            if magic != _MAGIC or hashlib.sha256(data[_HEAD.size:]).digest() != digest:
                return None
            meta = load_json(data[_HEAD.size:_HEAD.size + meta_len])
            blob = data[_HEAD.size + meta_len:]
            artifacts, pos = {}, 0
            for rel, size in meta["files"]:
                artifacts[rel] = blob[pos:pos + size]
                pos += size
            return Entry(artifacts, meta["kernels"]) if pos == len(blob) else None
        except (BundleError, ValueError, KeyError, struct.error, TypeError):
            return None

    def put(self, key: str, entry: Entry) -> None:
        """Store atomically; failures to write are ignored (the cache is an optimization)."""
        if self.root is None:
            return
        files = sorted(entry.artifacts.items())
        blob = b"".join(data for _, data in files)
        meta = json.dumps({"files": [[rel, len(data)] for rel, data in files],
                           "kernels": entry.kernels}).encode()
        body = meta + blob
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(_HEAD.pack(_MAGIC, hashlib.sha256(body).digest(), len(meta)) + body)
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass
