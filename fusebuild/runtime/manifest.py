"""Reading and checking a bundle's manifest.json (DESIGN §4). Shared by runtime and build.

Every reader of a bundle (runtime.load, verify, list, inspect, pack, merge, archive extraction)
goes through `check_manifest`: artifact paths are plain relative paths inside the bundle, every
kernel names a listed artifact of its target's folder and carries that artifact's sha256. Files
are opened by `open_regular`: regular files only (no FIFOs or devices) and no symbolic link
anywhere below the bundle directory.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import stat
from dataclasses import dataclass

from .. import dtypes as dt
from ..argspec import parse_key, symbol_name
from ..errors import BundleError

FORMAT = 1           # bump when a loader could not read bundles written by this version
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 28
MAX_ARTIFACT_BYTES = 1 << 32
MAX_JSON_DEPTH = 64  # nesting of a manifest or miss record (a manifest's is 5 or 6)
_FIELDS = ("name", "version", "id", "toolchain", "groups", "artifacts", "kernels")


@dataclass(frozen=True)
class KernelEntry:
    key: str
    group: str
    target: str
    file: str
    symbol: str
    sha256: str
    outputs: tuple[str, ...]      # output dtype names


def bundle_id(manifest: dict) -> str:
    """sha256 over the canonical JSON of everything in the manifest except the id itself."""
    body = {k: v for k, v in manifest.items() if k != "id"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def group_hash(group: dict) -> str:
    """The spec_hash of a group from its manifest JSON (`syntax.Group.to_json`): sha256 over
    everything that determines its code, i.e. all but its doc (and the spec_hash itself)."""
    body = {k: v for k, v in group.items() if k not in ("doc", "spec_hash")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def load_json(text: str | bytes):
    """JSON `text` (bytes must be UTF-8) nested at most MAX_JSON_DEPTH deep, so that what reads,
    hashes or dumps it cannot exhaust the recursion limit; ValueError saying why otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")            # strict: UTF-16, UTF-32 or bad bytes refused
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text)
        deep = _depth(value) > MAX_JSON_DEPTH
    except RecursionError:
        deep = True
    if deep:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value) -> int:
    """How deep arrays and objects nest in a JSON value (0 for a scalar), without recursion:
    level by level, visiting containers only (it runs on every manifest load)."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        level = [c for item in level for c in (item.values() if isinstance(item, dict) else item)
                 if isinstance(c, (dict, list))]
    return depth


# ---------------------------------------------------------------- files ------------------------

def is_plain_path(rel) -> bool:
    """A normalized relative path of the bundle: no '..', '.', empty part, NUL or leading '/'."""
    return (isinstance(rel, str) and rel != "" and "\0" not in rel and "\\" not in rel
            and not rel.startswith("/") and posixpath.normpath(rel) == rel
            and all(p not in ("", ".", "..") for p in rel.split("/")))


def open_regular(root: str, rel: str) -> int:
    """A read-only fd of `root/rel`, a regular file reached through real directories: no
    component below `root` may be a symbolic link, and FIFOs or devices are refused unopened."""
    path = os.path.join(root, rel)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise BundleError(f"cannot open bundle directory {root}: {e.strerror}") from None
    try:
        *folders, name = rel.split("/")
        for part in folders:
            fd, parent = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                                 os.O_CLOEXEC, dir_fd=fd), fd
            os.close(parent)
        mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise OSError(errno.ELOOP, "a symbolic link")
        file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                          dir_fd=fd) if stat.S_ISREG(mode) else None
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise BundleError(f"{path} is missing from the bundle") from None
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise BundleError(f"{path} is or passes through a symbolic link (or a file where a "
                              "folder belongs): bundles hold regular files and folders only"
                              ) from None
        raise BundleError(f"cannot open {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if file_fd is not None and not stat.S_ISREG(os.fstat(file_fd).st_mode):  # swapped meanwhile
        os.close(file_fd)
        file_fd = None
    if file_fd is None:
        raise BundleError(f"{path} is not a regular file (a FIFO, device or folder): refused")
    return file_fd


def read_regular(root: str, rel: str, limit: int) -> bytes:
    """The bytes of regular file `root/rel` (see `open_regular`), at most `limit` of them."""
    try:
        return _read_all(open_regular(root, rel), limit)
    except OSError as e:
        raise BundleError(f"{os.path.join(root, rel)} is {e.strerror}") from None


def _read_all(fd: int, limit: int) -> bytes:
    """Every byte of the open regular file `fd`, read by its fstat size (a buffer of `limit`
    bytes is allocated up front by CPython: never ask for one); OSError past `limit` or when the
    size changed meanwhile. Closes `fd`."""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes, over the limit of {limit}")
        data = f.read(size + 1)
    if len(data) != size:
        raise OSError(errno.EIO, f"{size} bytes by its size, {len(data)} read: it changed "
                                 "while it was read")
    return data


class NotRegularFile(OSError):
    """A path that `open_regular_file` refuses: a FIFO, a device, a folder."""


def open_regular_file(path: str, flags: int = os.O_RDONLY) -> int:
    """An fd of `path` (not a bundle file: symbolic links are followed) opened with `flags`
    and O_NONBLOCK, so that a FIFO never blocks; NotRegularFile unless it is a regular file."""
    refused = NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, device or folder)")
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR):    # a FIFO without reader, a folder
            raise refused from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refused
    return fd


def read_regular_file(path: str, limit: int) -> bytes:
    """The bytes of regular file `path` (`open_regular_file`); OSError beyond `limit` bytes."""
    return _read_all(open_regular_file(path), limit)


def kernel_file(root: str, artifacts: dict[str, dict], rel: str) -> tuple[str, str, int | None]:
    """(root, relative path, recorded size) of a kernel's file: a bundle artifact, or a kernel
    compiled on the fly, whose absolute path in the cache has no recorded size."""
    if os.path.isabs(rel):
        return *os.path.split(rel), None
    return root, rel, artifacts[rel]["size"]


def read_artifact(root: str, rel: str, sha256: str, size: int | None = None) -> bytes:
    """The bytes of an artifact, checked against its sha256 (and size): callers use these very
    bytes, so a file swapped after a check is refused, never used."""
    fd = open_regular(root, rel)
    with os.fdopen(fd, "rb") as f:
        n = os.fstat(fd).st_size
        data = f.read(n + 1) if n == size or (size is None and n <= MAX_ARTIFACT_BYTES) else b""
    if len(data) != n or hashlib.sha256(data).hexdigest() != sha256:
        raise BundleError(f"{os.path.join(root, rel)} is corrupt or tampered with: its sha256 "
                          "does not match the manifest")
    return data


def verify_artifacts(root: str, manifest: dict, files: list[str] | None = None) -> None:
    """Check size and sha256 of the artifacts (all, or `files`); BundleError names the file."""
    for rel in files if files is not None else sorted(manifest["artifacts"]):
        info = manifest["artifacts"].get(rel)
        if info is None:
            raise BundleError(f"{rel} is not an artifact of bundle {root}")
        fd = open_regular(root, rel)
        with os.fdopen(fd, "rb") as f:
            ok = os.fstat(fd).st_size == info["size"]
            if ok:
                h, left = hashlib.sha256(), info["size"]
                while left and (block := f.read(min(left, 1 << 20))):
                    h.update(block)
                    left -= len(block)
                ok = not left and h.hexdigest() == info["sha256"]
        if not ok:
            raise BundleError(f"{os.path.join(root, rel)} is corrupt or tampered with: its sha256 "
                              "does not match the manifest")


# ---------------------------------------------------------------- the manifest -----------------

def read_manifest(root: str) -> dict:
    """Load and check manifest.json of the bundle directory `root` (artifact hashes not read)."""
    if not os.path.isdir(root):
        raise BundleError(f"no bundle at {root}: not a directory")
    path = os.path.join(root, MANIFEST)
    if not os.path.lexists(path):
        raise BundleError(f"{root} is not a fusebuild bundle: {MANIFEST} is missing")
    data = read_regular(root, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        manifest = load_json(data)
    except ValueError as e:
        raise BundleError(f"{path} is not JSON of a manifest: {e}") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest, where: str) -> None:
    """Format, id and structure of a manifest; `where` names it in errors. Checks that every
    artifact path is plain and every kernel entry fits its group, file and hash."""
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise BundleError(f"{where} is not a fusebuild manifest (no 'format')")
    if type(manifest["format"]) is not int or manifest["format"] != FORMAT:
        raise BundleError(f"{where}: bundle format {manifest['format']!r}; this fusebuild "
                          f"reads format {FORMAT}: rebuild the bundle or use a matching fusebuild")
    for field in _FIELDS:
        if field not in manifest:
            raise BundleError(f"{where} lacks the field '{field}'")
    if bundle_id(manifest) != manifest["id"]:
        raise BundleError(f"{where} was modified: its content does not match its id "
                          f"{str(manifest['id'])[:12]}")
    try:
        _check_structure(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{where} is malformed: {e}") from None


def _check_structure(m: dict) -> None:
    """Raises BundleError naming the defect, or KeyError/TypeError/ValueError for bad shapes."""
    artifacts, groups = m["artifacts"], m["groups"]
    if not (isinstance(artifacts, dict) and isinstance(groups, dict)
            and isinstance(m["kernels"], list)):
        raise TypeError("artifacts and groups must be objects, kernels a list")
    for rel, info in artifacts.items():
        if not is_plain_path(rel) or rel == MANIFEST:
            raise BundleError(f"artifact path {rel!r} is not a plain relative path inside the "
                              "bundle (absolute, '..', '.', or empty parts)")
        size, digest = info["size"], info["sha256"]
        if type(size) is not int or not 0 <= size <= MAX_ARTIFACT_BYTES or \
                not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"artifact {rel} has a bad size or sha256")
    if not all(isinstance(m[f], str) and "/" not in m[f] and "\0" not in m[f]
               for f in ("name", "version")):
        raise BundleError("the bundle's name and version must be strings without '/'")
    tensors = {}
    for name, g in groups.items():
        if g["name"] != name or not isinstance(g["has_random"], bool) or \
                not isinstance(g.get("reduce", False), bool):
            raise ValueError(f"group {name!r} is malformed")
        tensors[name] = 0
        for i in g["inputs"]:
            scalar = i["kind"] == "scalar"
            tensors[name] += not scalar
            if not isinstance(i["name"], str) or i["kind"] not in ("tensor", "scalar") or \
                    not _dtype_or_none(i["dtype"]) or (scalar and i["dtype"] is None) or \
                    not _pair_or_none(i["chunk"]):
                raise ValueError(f"group {name!r} has a malformed input")
        for o in g["outputs"]:
            if not isinstance(o["name"], str) or not _dtype_or_none(o["dtype"]) or \
                    not _pair_or_none(o["cat"]) or not isinstance(o.get("row", False), bool):
                raise ValueError(f"group {name!r} has a malformed output")
    owners: dict[str, str] = {}           # file -> the group of its kernels
    for k in m["kernels"]:
        defect = _kernel_defect(k, artifacts, groups, tensors)
        if not defect and owners.setdefault(k["file"], k["group"]) != k["group"]:
            defect = f"its file {k['file']} holds kernels of group {owners[k['file']]}"
        if defect:
            raise BundleError(f"kernel {k['key']} [{k['target']}]: {defect}")


def _kernel_defect(k: dict, artifacts: dict, groups: dict, tensors: dict) -> str | None:
    """What is wrong with kernel entry `k`, or None."""
    group, descs = parse_key(k["key"])
    if k["group"] != group or group not in groups or len(descs) != tensors[group]:
        return f"does not fit group {k['group']!r} of the manifest"
    if k["symbol"] != symbol_name(k["key"]):
        return f"symbol {k['symbol']!r} is not its key's"
    info = artifacts.get(k["file"]) if isinstance(k["file"], str) else None
    if info is None:
        return f"file {k['file']!r} is not a listed artifact of the bundle"
    backend, _, arch = str(k["target"]).partition(":")
    if backend not in ("cpu", "cuda") or not k["file"].startswith(f"{backend}/{arch}/"):
        return f"file {k['file']} is not in the folder of its target"
    if k["sha256"] != info["sha256"]:
        return f"its sha256 differs from that of its file {k['file']}"
    if len(k["outputs"]) != len(groups[group]["outputs"]) or \
            not all(o in dt.BY_NAME for o in k["outputs"]):
        return f"its outputs do not fit group {group}"
    return None


def _dtype_or_none(d) -> bool:
    return d is None or d in dt.BY_NAME


def _pair_or_none(v) -> bool:
    """None or an [n, dim] pair of ints (a chunk or cat)."""
    return v is None or (isinstance(v, list) and len(v) == 2 and
                         all(type(x) is int for x in v) and v[0] > 0)


def kernel_entries(manifest: dict) -> list[KernelEntry]:
    return [KernelEntry(k["key"], k["group"], k["target"], k["file"], k["symbol"], k["sha256"],
                        tuple(k["outputs"])) for k in manifest["kernels"]]


# ---------------------------------------------------------------- the groups' IR ---------------

def group_ir(g: dict):
    """The IR (`syntax.Group`) of a manifest group; BundleError unless the group's JSON is exactly
    what that IR writes, so its inputs, chunks, outputs and cats are those of its body."""
    from .. import syntax      # the parser and typer: only needed once a kernel is called
    from ..errors import SpecError
    try:
        group = syntax.group_from_json(g)
    except (SpecError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"group {g.get('name')!r} of the manifest is invalid: {e}") from None
    if {**group.to_json(), "spec_hash": group.spec_hash} != g:
        raise BundleError(f"group {group.name} of the manifest does not match its own body "
                          "(inputs, outputs, chunks or hash edited)")
    return group


def output_dtypes(group, key: str) -> tuple[dt.DType, ...]:
    """The output dtypes of kernel `key` as the typed IR of `group` derives them."""
    from .. import ir
    from ..errors import SpecError
    names = [i.name for i in group.tensor_inputs]
    try:
        kernel = ir.instantiate(group, {n: d for n, (d, _) in zip(names, parse_key(key)[1])})
    except SpecError as e:
        raise BundleError(f"kernel {key}: group {group.name} does not type-check for its "
                          f"dtypes: {e}") from None
    return tuple(o.dtype for o in kernel.outputs)
