"""Bundles on disk (DESIGN §4): manifest assembly, atomic reproducible writes, shard merging,
deterministic archives."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
import tempfile

from .errors import BundleError
from .runtime.manifest import (FORMAT, MANIFEST, bundle_id, canonical_json, check_manifest,
                               read_artifact, read_manifest, verify_artifacts)


def make_manifest(name: str, version: str, toolchain: dict, groups: dict[str, dict],
                  artifacts: dict[str, bytes], kernels: list[dict], **extra) -> dict:
    """A manifest with sorted entries and its id; no timestamps, paths or host names."""
    manifest = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "toolchain": dict(sorted(toolchain.items())),
        "groups": {k: groups[k] for k in sorted(groups)},
        "artifacts": {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                      for rel, data in sorted(artifacts.items())},
        "kernels": sorted(kernels, key=lambda k: (k["group"], k["key"], k["target"])),
        **extra,
    }
    manifest["id"] = bundle_id(manifest)
    return manifest


def plan_hash(modules, toolchain: dict, name: str, version: str) -> str:
    """Identity of a whole build (specs, matrix, targets, toolchain), shared by its shards."""
    body = {"name": name, "version": version, "toolchain": toolchain,
            "modules": [[m.group.name, m.target, m.group.spec_hash, [v.key for v in m.variants]]
                        for m in modules]}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------- atomic writes ----------------

def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), b)


@contextlib.contextmanager
def _locked(directory: str):
    """An exclusive lock on `directory` itself (no lock file): its writers take turns."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)        # releases the lock


def _remove_stale_stages(out_dir: str, base: str) -> None:
    """Remove what killed writes of bundle `base` left: stages (.tmp) and swapped-out (.old)
    copies, and the lock file earlier versions left. Called under the lock, when no other write of
    `base` is in progress."""
    for name in os.listdir(out_dir):
        if name == f".{base}.lock":
            os.unlink(os.path.join(out_dir, name))
        elif name.startswith(f".{base}.") and name.endswith((".tmp", ".old")):
            _discard(os.path.join(out_dir, name))


def _discard(path: str) -> None:
    """Delete a stage or old copy, its manifest first so it is never mistaken for a bundle."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(path, MANIFEST))
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done (a swap is never left half done)."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _intact(path: str, manifest: dict) -> bool:
    try:
        existing = read_manifest(path)
        if existing["id"] != manifest["id"]:
            return False
        verify_artifacts(path, existing)
        return True
    except BundleError:
        return False


def write_bundle(out_dir: str, manifest: dict, artifacts: dict[str, bytes],
                 suffix: str = "") -> tuple[str, bool]:
    """Write the bundle to out_dir/<name>-<version><suffix>; returns (path, written).

    Nothing is written when an intact bundle with the same id is already there. Otherwise the
    bundle is staged in a temporary directory beside the target and swapped in with one atomic
    exchange (or rename), under a lock on out_dir, so readers and killed builds see the old or
    the new bundle, never a mix; what killed writes left is removed first.
    """
    check_manifest(manifest, f"the manifest of {manifest['name']}-{manifest['version']}")
    if sorted(artifacts) != sorted(manifest["artifacts"]):
        raise BundleError("the artifacts to write are not those of the manifest")
    base = f"{manifest['name']}-{manifest['version']}{suffix}"
    final = os.path.join(out_dir, base)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = _locked(out_dir)
        lock.__enter__()
    except OSError as e:
        raise BundleError(f"cannot write to output directory {out_dir}: {e.strerror}") from None
    try:
        _remove_stale_stages(out_dir, base)
        if _intact(final, manifest):
            return final, False
        stage = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=out_dir)
        try:
            for rel, data in artifacts.items():
                path = os.path.join(stage, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            with open(os.path.join(stage, MANIFEST), "wb") as f:
                f.write(manifest_bytes(manifest))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(stage, 0o755)
            old = None
            with _signals_held():
                if os.path.isdir(final) and _exchange(stage, final):
                    old = stage                                 # stage now holds the old bundle
                elif os.path.isdir(final):
                    old = stage[:-len(".tmp")] + ".old"
                    os.rename(final, old)
                    os.rename(stage, final)
                else:
                    os.rename(stage, final)
            if old:
                _discard(old)
        except OSError:
            _discard(stage)
            raise
        return final, True
    except OSError as e:                  # a read-only or full out_dir, from mkdtemp on
        raise BundleError(f"cannot write bundle {final}: {e.strerror or e}") from None
    finally:
        lock.__exit__(None, None, None)


def read_bundle_files(root: str, manifest: dict) -> dict[str, bytes]:
    """Every artifact's bytes, each checked against its size and sha256."""
    return {rel: read_artifact(root, rel, info["sha256"], info["size"])
            for rel, info in manifest["artifacts"].items()}


# ---------------------------------------------------------------- shards -----------------------

def merge_shards(paths: list[str], out_dir: str) -> tuple[str, dict]:
    """Merge the shard bundles of one build into the bundle an unsharded build writes."""
    shards = []
    for p in paths:
        m = read_manifest(p)
        s = m.get("shard")
        if not (isinstance(s, dict) and isinstance(s.get("plan"), str)
                and all(type(s.get(f)) is int for f in ("index", "count"))):
            raise BundleError(f"{p} is not a shard (it was not built with --shard)")
        shards.append((p, m, read_bundle_files(p, m)))
    first_path, first, _ = shards[0]
    seen: dict[int, str] = {}
    for p, m, _ in shards:
        s = m["shard"]
        if s["plan"] != first["shard"]["plan"] or s["count"] != first["shard"]["count"]:
            raise BundleError(f"shards {first_path} and {p} come from different builds: "
                              f"{_difference(first, m)}")
        if s["index"] in seen:
            raise BundleError(f"overlapping shards: {seen[s['index']]} and {p} are both shard "
                              f"{s['index'] + 1}/{s['count']}")
        seen[s["index"]] = p
    count = first["shard"]["count"]
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise BundleError(f"missing shard(s) {', '.join(f'{i + 1}/{count}' for i in missing)}")
    artifacts: dict[str, bytes] = {}
    kernels: list[dict] = []
    for _, m, files in shards:
        artifacts.update(files)
        kernels += m["kernels"]
    manifest = make_manifest(first["name"], first["version"], first["toolchain"], first["groups"],
                             artifacts, kernels)
    path, _ = write_bundle(out_dir, manifest, artifacts)
    return path, manifest


def _difference(a: dict, b: dict) -> str:
    if a["toolchain"] != b["toolchain"]:
        diff = {k: (a["toolchain"].get(k), b["toolchain"].get(k))
                for k in set(a["toolchain"]) | set(b["toolchain"])
                if a["toolchain"].get(k) != b["toolchain"].get(k)}
        return "toolchains differ: " + ", ".join(f"{k} {x} vs {y}" for k, (x, y) in sorted(diff.items()))
    if (a["name"], a["version"]) != (b["name"], b["version"]):
        return f"bundles differ: {a['name']}-{a['version']} vs {b['name']}-{b['version']}"
    groups = sorted(g for g in set(a["groups"]) | set(b["groups"])
                    if a["groups"].get(g) != b["groups"].get(g))
    if groups:
        return "specs differ in group(s) " + ", ".join(groups)
    return "the spec matrices or targets differ"


# ---------------------------------------------------------------- archives ---------------------

def pack(root: str, out: str | None = None) -> str:
    """A deterministic .tar.gz of a verified bundle (sorted, zero times, no owners)."""
    root = os.path.abspath(root)
    manifest = read_manifest(root)
    files = {MANIFEST: manifest_bytes(manifest), **read_bundle_files(root, manifest)}
    top = os.path.basename(root.rstrip("/"))
    out = out or root.rstrip("/") + ".tar.gz"
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for rel in [MANIFEST] + sorted(manifest["artifacts"]):
                data = files[rel]
                info = tarfile.TarInfo(f"{top}/{rel}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pack-", dir=os.path.dirname(os.path.abspath(out)))
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, out)
    except OSError as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise BundleError(f"cannot write archive {out}: {e.strerror or e}") from None
    return out
