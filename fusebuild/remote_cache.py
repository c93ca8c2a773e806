"""The shared compile cache behind the local one (DESIGN §11), on fsspec: `file:///path` (NFS, a
mounted volume) or `s3://bucket/prefix` (s3fs: endpoint and credentials from the AWS variables or
fsspec's config, e.g. FSSPEC_S3_ENDPOINT_URL). fsspec is imported only when one is opened.

Layout: `cas/<sha256>` holds the bytes of a local cache entry (`cache.encode_entry`) under their
sha256, `ac/<module key>` a JSON record {sha256, size, fusebuild, producer}. Writers upload the
blobs first and the records last, so a record never points at a blob not yet written. Readers
check the record, the blob's size and sha256 and the entry's own checksum: anything else is a miss
(one warning), which a `readwrite` build then overwrites. Writers of one key from several machines
write the same bytes: a PUT is atomic per object, and on a file system each file is written under
a temporary name and renamed.

Faults never fail the build: the first I/O error or timeout turns the shared cache off for the
rest of the run (one warning) and the build goes on with the local cache; S3 requests have
bounded timeouts and retries.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import uuid
import warnings
from urllib.parse import urlsplit

from . import __version__
from .cache import Entry, decode_entry, encode_entry
from .errors import CacheWarning, UsageError
from .runtime.manifest import MAX_ARTIFACT_BYTES, load_json

MODES = ("read", "readwrite")
MAX_RECORD_BYTES = 4096
# botocore settings that keep a dead or stalled endpoint from holding up a build: about 15 s to
# give up on a host that does not answer, 45 s on one that accepts and then stalls. Entries of
# fsspec's own config (FSSPEC_S3='{"config_kwargs": ...}' or its files) take precedence.
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 15,
             "retries": {"max_attempts": 3, "mode": "standard"}}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RemoteCache:
    """A shared cache at `url`; `mode` 'read' never writes, 'readwrite' uploads new entries."""

    def __init__(self, url: str, mode: str = "read"):
        self.scheme = urlsplit(url).scheme
        if self.scheme not in ("file", "s3"):
            raise UsageError(f"--cache-url takes a file:///path or s3://bucket/prefix URL; got "
                             f"{url!r}")
        if mode not in MODES:
            raise UsageError(f"--cache-mode is one of {', '.join(MODES)}; got {mode!r}")
        self.url, self.writable, self.off = url.rstrip("/"), mode == "readwrite", False
        self.fs, self.root = _filesystem(url, self.scheme)
        self._check_root()

    def _check_root(self) -> None:
        """A bucket or folder that does not exist is an error (a mistyped URL would otherwise
        make every build cold, silently); an unreachable one turns the cache off."""
        bucket = self.root.split("/")[0]
        try:
            if self.scheme == "s3":
                self.fs.call_s3("head_bucket", Bucket=bucket)
            elif not self.fs.isdir(self.root):
                raise FileNotFoundError(self.root)
        except FileNotFoundError:
            what = f"bucket {bucket!r}" if self.scheme == "s3" else f"folder {self.root}"
            raise UsageError(f"shared cache {self.url}: {what} does not exist (create it, or "
                             "check --cache-url)") from None
        except PermissionError:         # e.g. credentials that may read objects only
            pass
        except Exception as e:  # noqa: BLE001 - whatever the storage library raises
            self._fail(e)

    def get_many(self, labels: dict[str, str]) -> dict[str, Entry]:
        """The good entries of the module keys of `labels` (key -> module label, for messages)."""
        keys = list(labels)
        records = self._read([self._record_path(k) for k in keys], [MAX_RECORD_BYTES] * len(keys))
        if records is None:
            return {}
        wanted: dict[str, tuple[str, int]] = {}
        for key, data in zip(keys, records):
            if isinstance(data, FileNotFoundError):
                continue
            record = _parse_record(data)
            if record is None:
                self.bad(labels[key], "its record is not a valid record")
            else:
                wanted[key] = record
        # one byte past the recorded size: a longer blob is caught without reading all of it
        blobs = self._read([self._blob_path(sha) for sha, _ in wanted.values()],
                           [size + 1 for _, size in wanted.values()])
        if blobs is None:
            return {}
        found = {}
        for (key, (sha, size)), data in zip(wanted.items(), blobs):
            if isinstance(data, FileNotFoundError):
                why = f"its record points at blob {sha[:12]}, which is missing"
            elif len(data) != size:
                why = f"its blob has {'more than ' if len(data) > size else ''}" \
                      f"{min(len(data), size)} bytes, its record says {size}"
            elif hashlib.sha256(data).hexdigest() != sha:
                why = "its blob's sha256 is not the one of its record"
            elif (entry := decode_entry(data)) is None:
                why = "its entry checksum fails"
            else:
                found[key] = entry
                continue
            self.bad(labels[key], why)
        return found

    def unshared(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        """Of `entries` (the local hits of a readwrite build), those the shared cache lacks:
        no record, or a record of other bytes. Only records are read."""
        if self.off or not self.writable or not entries:
            return {}
        keys = list(entries)
        records = self._read([self._record_path(k) for k in keys], [MAX_RECORD_BYTES] * len(keys))
        if records is None:
            return {}
        return {key: entries[key] for key, data in zip(keys, records)
                if isinstance(data, FileNotFoundError)
                or _parse_record(data) != _digest(encode_entry(entries[key]))}

    def put_many(self, entries: dict[str, Entry]) -> int:
        """Upload `entries` (module key -> entry), blobs first; how many were uploaded."""
        if self.off or not self.writable or not entries:
            return 0
        blobs, records = {}, {}
        for key, entry in entries.items():
            data = encode_entry(entry)
            sha, size = _digest(data)
            blobs[self._blob_path(sha)] = data
            records[self._record_path(key)] = json.dumps(
                {"sha256": sha, "size": size, "fusebuild": __version__,
                 "producer": socket.gethostname()}, sort_keys=True).encode()
        try:
            self._write(blobs)
            self._write(records)
        except PermissionError as e:
            self.writable = False
            self.warn(f"shared cache {self.url}: no write access ({_one_line(e)}); this build "
                      "uploads nothing (--cache-mode read is the mode for read-only credentials)")
            return 0
        except Exception as e:  # noqa: BLE001 - whatever the storage library raises
            self._fail(e)
            return 0
        return len(entries)

    def bad(self, label: str, why: str) -> None:
        """Warn of an unusable entry, which counts as a miss."""
        fix = "; this build overwrites it" if self.writable and not self.off else ""
        self.warn(f"shared cache {self.url}: the entry of {label} is unusable ({why}): a "
                  f"miss{fix}")

    def warn(self, message: str) -> None:
        warnings.warn(message, CacheWarning, stacklevel=3)

    def _fail(self, e: Exception) -> None:
        self.off = True
        self.warn(f"shared cache {self.url} is off for the rest of this build: {_one_line(e)}")

    def _record_path(self, key: str) -> str:
        return f"{self.root}/ac/{key}"

    def _blob_path(self, sha: str) -> str:
        return f"{self.root}/cas/{sha}"

    def _read(self, paths: list[str], ends: list[int]) -> list | None:
        """The first `ends[i]` bytes of each path, or its FileNotFoundError; None once the cache
        is off (after this or an earlier I/O error)."""
        if self.off or not paths:
            return None if self.off else []
        try:
            out = self.fs.cat_ranges(paths, [0] * len(paths), ends, on_error="return")
        except Exception as e:  # noqa: BLE001 - whatever the storage library raises
            self._fail(e)
            return None
        out = [b"" if _empty(r) else r for r in out]
        failed = [r for r in out
                  if isinstance(r, Exception) and not isinstance(r, FileNotFoundError)]
        if failed:
            self._fail(failed[0])
            return None
        return out

    def _write(self, files: dict[str, bytes]) -> None:
        if self.scheme == "s3":
            self.fs.pipe(files)          # concurrent PUTs, each atomic
            return
        for path, data in files.items():
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)    # a rename: readers see the old file or the new one
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.rm_file(tmp)
                raise


def _filesystem(url: str, scheme: str):
    """(fsspec file system, root path without a trailing slash) of `url`."""
    try:
        import fsspec
        if scheme == "s3":
            import s3fs  # noqa: F401 - fsspec would say only "install s3fs"
            conf = fsspec.config.conf.get("s3", {}).get("config_kwargs", {})
            fs, root = fsspec.core.url_to_fs(url, config_kwargs={**S3_CONFIG, **conf},
                                             skip_instance_cache=True)
            fs.retries = 1  # botocore's retries above are the bound; s3fs's would multiply them
        else:
            fs, root = fsspec.core.url_to_fs(url, auto_mkdir=True)
    except ModuleNotFoundError as e:
        raise UsageError(f"--cache-url {scheme}:// needs {e.name}, which is not installed: pip "
                         "install 'fusebuild[distributed]'") from None
    return fs, root.rstrip("/")


def _digest(blob: bytes) -> tuple[str, int]:
    """(sha256, size) of a blob, as its record holds them."""
    return hashlib.sha256(blob).hexdigest(), len(blob)


def _parse_record(data: bytes) -> tuple[str, int] | None:
    """(sha256, size) of an action record, or None if it is not a valid one."""
    try:
        record = load_json(data)
        sha, size = record["sha256"], record["size"]
    except (ValueError, KeyError, TypeError):
        return None
    ok = (isinstance(sha, str) and _SHA256.fullmatch(sha) and type(size) is int
          and 0 < size <= MAX_ARTIFACT_BYTES)
    return (sha, size) if ok else None


def _empty(result) -> bool:
    """Whether a read's result is S3's answer to a range read of an empty object (InvalidRange,
    which s3fs raises as an OSError): such a file is read as no bytes, a miss, not an I/O error."""
    cause = getattr(result, "__cause__", None) if isinstance(result, OSError) else None
    return getattr(cause, "response", {}).get("Error", {}).get("Code") == "InvalidRange"


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
