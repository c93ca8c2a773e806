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
import re
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable

from . import __version__
from .errors import BundleError, UsageError
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
        """The entry, or None if absent, truncated or corrupt. A hit refreshes the entry's
        mtime: `prune` removes the least recently used entries first."""
        if self.root is None:
            return None
        path = self._path(key)
        try:
            entry = decode_entry(read_regular(*os.path.split(path), limit=MAX_ARTIFACT_BYTES))
        except BundleError:
            return None
        if entry is not None:
            try:
                os.utime(path)
            except OSError:              # a read-only cache still serves its entries
                pass
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Store atomically; failures to write are ignored (the cache is an optimization)."""
        if self.root is None:
            return
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(encode_entry(entry))
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass

    def entries(self) -> list[tuple[str, os.stat_result]]:
        """The path and stat of every entry (temporary files of running writers excluded)."""
        out = []
        for folder, _, files in os.walk(os.path.join(self.root, LAYOUT)):
            for name in files:
                path = os.path.join(folder, name)
                if not name.startswith(".tmp-"):
                    try:
                        out.append((path, os.stat(path)))
                    except OSError:      # removed by a concurrent prune
                        pass
        return out

    def stats(self) -> tuple[int, int]:
        """(entries, bytes) of the cache."""
        sizes = [st.st_size for _, st in self.entries()]
        return len(sizes), sum(sizes)

    def prune(self, max_bytes: int) -> tuple[int, int]:
        """Remove the least recently used entries until the cache holds at most `max_bytes`;
        (entries removed, bytes freed)."""
        entries = sorted(self.entries(), key=lambda e: e[1].st_mtime)
        total = sum(st.st_size for _, st in entries)
        removed = freed = 0
        for path, st in entries:
            if total - freed <= max_bytes:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:    # a concurrent prune took it
                pass
            removed, freed = removed + 1, freed + st.st_size
        return removed, freed


def encode_entry(entry: Entry) -> bytes:
    """The bytes of a cache entry: head (magic, checksum, metadata length), metadata, artifacts."""
    files = sorted(entry.artifacts.items())
    blob = b"".join(data for _, data in files)
    meta = json.dumps({"files": [[rel, len(data)] for rel, data in files],
                       "kernels": entry.kernels}).encode()
    body = meta + blob
    return _HEAD.pack(_MAGIC, hashlib.sha256(body).digest(), len(meta)) + body


def decode_entry(data: bytes) -> Entry | None:
    """The entry of `data`, or None if it is truncated or corrupt (its checksum fails)."""
    try:
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


def parse_size(text: str) -> int:
    """Bytes of a size such as 500M, 2G, 1.5GiB or 1000000 (K/M/G/T: powers of 1000; KiB, MiB,
    GiB, TiB: powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"a size is a number with an optional unit K, M, G, T (or KiB, MiB, "
                         f"GiB, TiB), e.g. 500M or 2G; got {text!r}")
    number, unit, binary = m.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** ("KMGT".index(unit.upper()) + 1 if unit else 0))


class CacheChain:
    """The local cache in front of an optional shared one (`remote_cache.RemoteCache`): remote
    hits are copied into the local cache, new entries go to both, and local hits that the shared
    cache lacks are uploaded too (readwrite). Counts the remote hits and the uploads (the local
    hits are the rest of the hits)."""

    def __init__(self, local: Cache, remote=None):
        self.local, self.remote = local, remote
        self.remote_hits = self.uploaded = 0
        self._unshared: dict[str, Entry] = {}     # local hits to upload

    def get_many(self, wanted: dict[str, tuple[str, Callable[[Entry], bool]]]
                 ) -> dict[str, Entry]:
        """The entries found of the keys of `wanted` (key -> the module's label, a check that
        an entry is the module's) that pass their check."""
        found = {}
        for key, (_, check) in wanted.items():
            hit = self.local.get(key)
            if hit is not None and check(hit):
                found[key] = hit
        if self.remote is None:
            return found
        self._unshared.update(self.remote.unshared(found))
        rest = {key: label for key, (label, _) in wanted.items() if key not in found}
        if rest:
            for key, entry in self.remote.get_many(rest).items():
                if not wanted[key][1](entry):
                    self.remote.bad(rest[key], "its kernels are not those of its module")
                    continue
                self.local.put(key, entry)
                found[key] = entry
                self.remote_hits += 1
        return found

    def put_many(self, entries: dict[str, Entry]) -> None:
        """Store new entries locally, and them and the unshared local hits in the shared cache."""
        for key, entry in entries.items():
            self.local.put(key, entry)
        if self.remote is not None:
            self.uploaded += self.remote.put_many({**self._unshared, **entries})
            self._unshared = {}
