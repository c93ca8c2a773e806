"""Loading packed bundles (.tar.gz): checked extraction into a cache keyed by bundle id.

Only what the archive's manifest lists is extracted (manifest.json, which `fusebuild pack` writes
first, then each listed artifact, of its recorded size and sha256), into a fresh directory that is
renamed into `<cache>/bundles/<id>` once everything matched. An archive with anything else in it
is refused, a bad extraction is deleted, and a cached directory that no longer verifies is
replaced, so one tampered archive cannot spoil the cache for the genuine one.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib

from ..errors import BundleError
from .manifest import (MANIFEST, MAX_MANIFEST_BYTES, check_manifest, is_plain_path, load_json,
                       read_manifest, verify_artifacts)

_TRAILER_BYTES = 1 << 16   # zero padding allowed after the end-of-archive blocks


def cache_home() -> str:
    """FUSEBUILD_CACHE_DIR, else $XDG_CACHE_HOME/fusebuild, else ~/.cache/fusebuild."""
    if os.environ.get("FUSEBUILD_CACHE_DIR"):
        return os.environ["FUSEBUILD_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusebuild")


def extract(path: str) -> str:
    """The directory of packed bundle `path`: its cached extraction, verified, or a new one."""
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz:
            return _extract(path, gz)
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise BundleError(f"cannot read or extract bundle archive {path} (truncated or not a "
                          f".tar.gz?): {e}") from None


def _extract(path: str, gz: gzip.GzipFile) -> str:
    tar = tarfile.open(fileobj=gz, mode="r|")
    members = iter(tar)
    top, name, m = _first_file(members, path)
    if name != f"{top}/{MANIFEST}" or m.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: the first file is not {top}/{MANIFEST} (make archives with "
                          "`fusebuild pack`)")
    manifest_data = tar.extractfile(m).read()
    try:
        manifest = load_json(manifest_data)
    except ValueError as e:
        raise BundleError(f"{path}: its {MANIFEST} is not JSON of a manifest: {e}") from None
    check_manifest(manifest, f"{path}:{MANIFEST}")
    dest = os.path.join(cache_home(), "bundles", manifest["id"])
    if _verified(dest, manifest["id"]):       # the archive is still read and checked in full
        _extract_artifacts(tar, members, top, manifest["artifacts"], None, path)
        _drain(gz, path)
        return dest
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{manifest['id'][:12]}.", dir=os.path.dirname(dest))
    except OSError as e:
        raise BundleError(f"cannot extract {path} into {os.path.dirname(dest)}: "
                          f"{e.strerror}") from None
    try:
        _write(stage, MANIFEST, manifest_data)
        _extract_artifacts(tar, members, top, manifest["artifacts"], stage, path)
        _drain(gz, path)
        _install(stage, dest, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest


def _first_file(members, path: str) -> tuple[str, str, tarfile.TarInfo]:
    """The archive's first regular-file member, its name and top directory."""
    for m in members:
        name = _check_member(m, path)
        if m.isfile():
            return name.split("/")[0], name, m
    raise BundleError(f"{path} is not a packed fusebuild bundle: no {MANIFEST}")


def _check_member(m: tarfile.TarInfo, path: str) -> str:
    """The member's normalized name; BundleError for unsafe paths, links and special files."""
    name = posixpath.normpath(m.name)
    if not is_plain_path(name):
        raise BundleError(f"{path}: unsafe member path {m.name!r}")
    if not (m.isfile() or m.isdir()):
        raise BundleError(f"{path}: member {m.name!r} is a link or special file")
    return name


def _extract_artifacts(tar: tarfile.TarFile, members, top: str, artifacts: dict,
                       stage: str | None, path: str) -> None:
    """Check each listed artifact in the rest of the archive (and write it into `stage`),
    refusing anything unlisted."""
    done = set()
    for m in members:
        name = _check_member(m, path)
        if m.isdir() and (name == top or name.startswith(f"{top}/")):
            continue
        rel = name[len(top) + 1:] if name.startswith(f"{top}/") else None
        info = artifacts.get(rel)
        if info is None or rel in done:
            why = "a second copy of an artifact" if rel in done else "not in its manifest"
            raise BundleError(f"{path}: member {m.name!r} is {why}: archive refused, nothing "
                              "extracted")
        if m.size != info["size"]:
            raise BundleError(f"{path}: {rel} has {m.size} bytes, the manifest says "
                              f"{info['size']}")
        data = tar.extractfile(m).read(info["size"])
        if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise BundleError(f"{path}: {rel} is corrupt or tampered with: its sha256 does not "
                              "match the manifest")
        if stage:
            _write(stage, rel, data)
        done.add(rel)
    missing = sorted(set(artifacts) - done)
    if missing:
        raise BundleError(f"{path} lacks {len(missing)} artifact(s) of its manifest: "
                          f"{', '.join(missing[:3])}")


def _write(stage: str, rel: str, data: bytes) -> None:
    target = os.path.join(stage, *rel.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "xb") as f:
        f.write(data)


def _drain(gz: gzip.GzipFile, path: str) -> None:
    """Read to the end of the gzip stream (which checks its CRC and length): the archive may
    end in zero padding only."""
    rest = gz.read(_TRAILER_BYTES + 1)
    if len(rest) > _TRAILER_BYTES or rest.strip(b"\0"):
        raise BundleError(f"{path}: data after the end of the archive")


def _verified(root: str, bundle_id: str) -> bool:
    """Whether `root` holds the intact bundle `bundle_id`."""
    try:
        manifest = read_manifest(root)
        verify_artifacts(root, manifest)
        return manifest["id"] == bundle_id
    except BundleError:
        return False


def _install(stage: str, dest: str, path: str) -> None:
    """Rename `stage` (every file checked) to `dest`, replacing a `dest` that does not verify
    (a concurrent extraction that got there first is kept)."""
    bundle_id = os.path.basename(dest)
    for _ in range(2):
        try:
            os.rename(stage, dest)
            return
        except OSError:
            if _verified(dest, bundle_id):
                return
            old = tempfile.mkdtemp(prefix=f".{bundle_id[:12]}.", suffix=".old",
                                   dir=os.path.dirname(dest))
            try:
                os.rename(dest, os.path.join(old, "bundle"))
            except OSError:
                pass
            shutil.rmtree(old, ignore_errors=True)
    raise BundleError(f"cannot extract {path} into {dest}")
