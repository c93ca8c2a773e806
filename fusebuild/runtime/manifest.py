"""Reading and checking a bundle's manifest.json (DESIGN §4). Shared by runtime and build."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..errors import BundleError

FORMAT = 1           # bump when a loader could not read bundles written by this version
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class KernelEntry:
    key: str
    group: str
    target: str
    file: str
    symbol: str
    sha256: str
    outputs: tuple[str, ...]      # output dtype names


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundle_id(manifest: dict) -> str:
    """sha256 over the canonical JSON of everything in the manifest except the id itself."""
    body = {k: v for k, v in manifest.items() if k != "id"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def read_manifest(root: str) -> dict:
    """Load and validate manifest.json of the bundle directory `root` (hashes not checked)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise BundleError(f"no bundle at {root}: not a directory")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise BundleError(f"{root} is not a fusebuild bundle: {MANIFEST} is missing") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is unreadable or not JSON: {e}") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise BundleError(f"{path} is not a fusebuild manifest (no 'format')")
    if manifest["format"] != FORMAT:
        raise BundleError(f"{root} has bundle format {manifest['format']!r}; this fusebuild "
                          f"reads format {FORMAT}: rebuild the bundle or use a matching fusebuild")
    for field in ("name", "version", "id", "toolchain", "groups", "artifacts", "kernels"):
        if field not in manifest:
            raise BundleError(f"{path} lacks the field '{field}'")
    if bundle_id(manifest) != manifest["id"]:
        raise BundleError(f"{path} was modified: its content does not match its id "
                          f"{manifest['id'][:12]}")
    return manifest


def verify_artifacts(root: str, manifest: dict, files: list[str] | None = None) -> None:
    """Check size and sha256 of the artifacts (all, or `files`); BundleError names the file."""
    for rel in files if files is not None else sorted(manifest["artifacts"]):
        info = manifest["artifacts"].get(rel)
        if info is None:
            raise BundleError(f"{rel} is not an artifact of bundle {root}")
        path = os.path.join(root, rel)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise BundleError(f"{path} is missing from the bundle") from None
        if size != info["size"] or sha256_file(path) != info["sha256"]:
            raise BundleError(f"{path} is corrupt or tampered with: its sha256 does not match "
                              "the manifest")


def kernel_entries(manifest: dict) -> list[KernelEntry]:
    return [KernelEntry(k["key"], k["group"], k["target"], k["file"], k["symbol"], k["sha256"],
                        tuple(k["outputs"])) for k in manifest["kernels"]]
