"""Writing bundles: manifest assembly and an atomic, reproducible directory write (DESIGN §4)."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import tempfile

from .errors import BundleError
from .runtime.manifest import FORMAT, MANIFEST, bundle_id


def make_manifest(name: str, version: str, toolchain: dict, groups: dict[str, dict],
                  artifacts: dict[str, bytes], kernels: list[dict]) -> dict:
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
    }
    manifest["id"] = bundle_id(manifest)
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), b)


def write_bundle(out_dir: str, manifest: dict, artifacts: dict[str, bytes]) -> str:
    """Write the bundle to out_dir/<name>-<version> atomically; returns that path.

    Everything is staged in a temporary directory beside the target, then swapped in with one
    atomic exchange (or rename), so readers and a killed build see the old or the new bundle,
    never a mix.
    """
    final = os.path.join(out_dir, f"{manifest['name']}-{manifest['version']}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=out_dir)
    except OSError as e:
        raise BundleError(f"cannot write to output directory {out_dir}: {e.strerror}") from None
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
        if os.path.isdir(final) and _exchange(stage, final):
            shutil.rmtree(stage, ignore_errors=True)        # stage now holds the old bundle
        elif os.path.isdir(final):
            old = stage + ".old"
            os.rename(final, old)
            os.rename(stage, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, final)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise BundleError(f"cannot write bundle {final}: {e.strerror or e}") from None
    return final
