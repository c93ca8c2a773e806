"""Loading packed bundles (.tar.gz): safe extraction into a cache keyed by bundle id."""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import tarfile
import tempfile

from ..errors import BundleError
from .manifest import MANIFEST

MAX_MEMBER_BYTES = 1 << 32      # no artifact is larger; refuses decompression bombs early


def cache_home() -> str:
    """FUSEBUILD_CACHE_DIR, else $XDG_CACHE_HOME/fusebuild, else ~/.cache/fusebuild."""
    if os.environ.get("FUSEBUILD_CACHE_DIR"):
        return os.environ["FUSEBUILD_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusebuild")


def _members(tar: tarfile.TarFile, path: str) -> tuple[str, dict[str, tarfile.TarInfo]]:
    """Validated regular-file members under one top directory: no absolute paths, no '..',
    no links or devices."""
    top, files = None, {}
    for m in tar.getmembers():
        name = posixpath.normpath(m.name)
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or name in (".", ""):
            raise BundleError(f"{path}: unsafe member path {m.name!r}")
        if not (m.isfile() or m.isdir()):
            raise BundleError(f"{path}: member {m.name!r} is a link or special file")
        if top is None:
            top = parts[0]
        if parts[0] != top:
            raise BundleError(f"{path}: members outside the bundle directory {top}/")
        if m.isfile():
            if m.size > MAX_MEMBER_BYTES:
                raise BundleError(f"{path}: member {m.name!r} is too large")
            files["/".join(parts[1:])] = m
    if top is None or MANIFEST not in files:
        raise BundleError(f"{path} is not a packed fusebuild bundle: no {MANIFEST}")
    return top, files


def extract(path: str) -> str:
    """The directory of packed bundle `path`, extracted (once per bundle id) into the cache."""
    try:
        tar = tarfile.open(path, "r:gz")
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"cannot read bundle archive {path}: {e}") from None
    with tar:
        _, files = _members(tar, path)
        try:
            manifest = json.loads(tar.extractfile(files[MANIFEST]).read())
            bid, sizes = manifest["id"], {k: v["size"] for k, v in manifest["artifacts"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BundleError(f"{path}: {MANIFEST} is not a fusebuild manifest") from None
        for rel, m in files.items():
            if rel != MANIFEST and rel in sizes and m.size != sizes[rel]:
                raise BundleError(f"{path}: {rel} has {m.size} bytes, the manifest says "
                                  f"{sizes[rel]}")
        if not isinstance(bid, str) or not bid.isalnum():
            raise BundleError(f"{path}: bad bundle id")
        root = os.path.join(cache_home(), "bundles")
        dest = os.path.join(root, bid)
        if os.path.isfile(os.path.join(dest, MANIFEST)):
            return dest
        try:
            os.makedirs(root, exist_ok=True)
            stage = tempfile.mkdtemp(prefix=f".{bid[:12]}.", dir=root)
        except OSError as e:
            raise BundleError(f"cannot extract {path} into {root}: {e.strerror}") from None
        try:
            for rel, m in files.items():
                target = os.path.join(stage, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            os.rename(stage, dest)
        except OSError:
            shutil.rmtree(stage, ignore_errors=True)
            if not os.path.isfile(os.path.join(dest, MANIFEST)):  # not a concurrent winner
                raise BundleError(f"cannot extract {path} into {dest}") from None
    return dest
