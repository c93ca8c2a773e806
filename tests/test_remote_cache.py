"""The shared compile cache (--cache-url): a real S3 API (moto's server, through s3fs) and a
file:// folder shared by two processes. One server and one cold build serve every case; each
case that must compile compiles one small group at one CPU level."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings

import pytest
from click.testing import CliRunner

from fusebuild import build as fb_build, spec
from fusebuild.cache import Cache, decode_entry
from fusebuild.cli import main
from fusebuild.errors import CacheWarning, UsageError
from fusebuild.remote_cache import RemoteCache

moto_server = pytest.importorskip("moto.server")
fsspec = pytest.importorskip("fsspec")
boto3 = pytest.importorskip("boto3")
requests = pytest.importorskip("requests")

SPEC = """fusebuild: 1
bundle: {name: shared, version: "1.0"}
targets: [cpu:x86-64-v2]
groups:
  - name: add1
    inputs: {x: tensor}
    outputs: [y]
    body: 'y = x + 1.0'
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
  - name: scale
    inputs: {x: tensor, a: scalar(float32)}
    outputs: [y]
    body: 'y = a * x'
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
"""
BUCKET = "fbcache"
MAIN = f"s3://{BUCKET}/main"
ADD1 = "add1 [cpu:x86-64-v2]"


class S3:
    """A moto S3 server on 127.0.0.1 that fsspec reaches through FSSPEC_S3_ENDPOINT_URL."""

    def __init__(self):
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0,
                                                     verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint)

    def objects(self, prefix: str) -> dict[str, bytes]:
        listing = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
        return {o["Key"][len(prefix) + 1:]: self.client.get_object(
            Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing.get("Contents", [])}

    def put(self, prefix: str, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    mp = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = S3()
    mp.setenv("FSSPEC_S3_ENDPOINT_URL", server.endpoint)   # what a user sets (CLI subprocesses)
    mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": server.endpoint})  # fsspec read it
    server.client.create_bucket(Bucket=BUCKET)
    yield server
    server.server.stop()
    mp.undo()


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared-specs")
    (d / "s.yaml").write_text(SPEC)
    return d


def build(specs, out, local, url=None, mode="read"):
    """(BuildResult, the shared cache's warnings) of a build with local cache `local`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fb_build.build(spec.load_plan([str(specs)]), str(out), cache_dir=str(local),
                                progress=False, cache_url=url, cache_mode=mode)
    return result, [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]


@pytest.fixture(scope="module")
def cold(s3, specs, tmp_path_factory):
    """The cold build that uploads both modules to MAIN; (result, warnings, local cache)."""
    d = tmp_path_factory.mktemp("cold")
    result, warned = build(specs, d / "out", d / "local", MAIN, "readwrite")
    return result, warned, d / "local"


def tree(path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `path`."""
    out = {}
    for folder, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                out[os.path.relpath(os.path.join(folder, n), path)] = f.read()
    return out


def keys_by_group(s3) -> dict[str, str]:
    """group -> module key, from MAIN's records and blobs."""
    objects = s3.objects("main")
    out = {}
    for name, data in objects.items():
        if name.startswith("ac/"):
            entry = decode_entry(objects["cas/" + json.loads(data)["sha256"]])
            out[entry.kernels[0]["group"]] = name[3:]
    return out


def local_with(cold, keys, tmp_path, groups):
    """A local cache holding the cold build's entries of `groups` only."""
    local = tmp_path / "local"
    for g in groups:
        dst = Cache(str(local))._path(keys[g])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(Cache(str(cold[2]))._path(keys[g]), dst)
    return local


@pytest.fixture(scope="module")
def keys(s3, cold):
    return keys_by_group(s3)


def test_cold_upload_then_an_empty_local_cache_is_served_by_remote_hits(s3, cold, specs,
                                                                        tmp_path):
    first, warned, _ = cold
    assert (first.compiled, first.cached, first.remote_hits, first.uploaded) == (2, 0, 0, 2)
    assert not warned
    objects = s3.objects("main")
    records = {n: json.loads(d) for n, d in objects.items() if n.startswith("ac/")}
    assert len(records) == 2 and len(objects) == 4
    for record in records.values():
        blob = objects["cas/" + record["sha256"]]
        assert hashlib.sha256(blob).hexdigest() == record["sha256"]
        assert record["size"] == len(blob) and decode_entry(blob) is not None
        assert set(record) == {"sha256", "size", "fusebuild", "producer"}
    again, warned = build(specs, tmp_path / "out", tmp_path / "local", MAIN)
    assert (again.compiled, again.cached, again.remote_hits, again.uploaded) == (0, 2, 2, 0)
    assert not warned and "0 compiled, 2 cached (0 local, 2 remote), 0 uploaded" in \
        again.summary()
    assert tree(again.path) == tree(first.path)
    assert Cache(str(tmp_path / "local")).stats()[0] == 2       # remote hits copied locally
    third, _ = build(specs, tmp_path / "out", tmp_path / "local", MAIN)
    assert (third.compiled, third.cached, third.remote_hits) == (0, 2, 0)


def test_readwrite_uploads_the_local_hits_the_shared_cache_lacks(s3, cold, specs, tmp_path):
    local = tmp_path / "local"
    shutil.copytree(cold[2], local)
    url = f"s3://{BUCKET}/backfill"
    first, warned = build(specs, tmp_path / "out", local, url, "readwrite")
    assert (first.compiled, first.cached, first.uploaded) == (0, 2, 2) and not warned
    assert s3.objects("backfill") == s3.objects("main")
    again, _ = build(specs, tmp_path / "out", local, url, "readwrite")
    assert (again.cached, again.uploaded) == (2, 0)


def test_a_build_without_a_cache_url_imports_no_fsspec(cold, specs, tmp_path):
    code = ("import sys; from fusebuild import build, spec; "
            f"build.build(spec.load_plan([{str(specs)!r}]), {str(tmp_path)!r}, "
            f"cache_dir={str(cold[2])!r}, progress=False); "
            "print(sorted(m for m in ('fsspec', 's3fs', 'botocore', 'aiobotocore') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def _flip(blob: bytes) -> bytes:
    i = len(blob) // 2
    return blob[:i] + bytes([blob[i] ^ 0x40]) + blob[i + 1:]


def damaged_copy(s3, keys, prefix: str, damage: str) -> bytes:
    """MAIN copied to `prefix`, add1's entry damaged; add1's good blob."""
    objects = s3.objects("main")
    for name, data in objects.items():
        s3.put(prefix, name, data)
    record_name = "ac/" + keys["add1"]
    blob_name = "cas/" + json.loads(objects[record_name])["sha256"]
    blob = objects[blob_name]
    if damage == "no_blob":
        s3.client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{blob_name}")
    elif damage == "record":
        s3.put(prefix, record_name, b'{"sha256": "' + b"0" * 63 + b'", "size": 1}')
    elif damage == "rewritten":     # a flipped blob under a record of its own sha256 and size
        bad = _flip(blob)
        sha = hashlib.sha256(bad).hexdigest()
        s3.put(prefix, "cas/" + sha, bad)
        s3.put(prefix, record_name, json.dumps({"sha256": sha, "size": len(bad)}).encode())
    else:
        s3.put(prefix, blob_name, {"flip": _flip(blob), "truncate": blob[:len(blob) // 2],
                                   "longer": blob + b"\0", "empty": b""}[damage])
    return blob


@pytest.mark.parametrize("damage, why", [
    ("flip", "its blob's sha256 is not the one of its record"),
    ("truncate", "bytes, its record says"), ("longer", "has more than"),
    ("empty", "its blob has 0 bytes"), ("no_blob", "which is missing"),
    ("record", "its record is not a valid record"), ("rewritten", "its entry checksum fails")])
def test_every_read_checks_record_size_and_sha256(s3, keys, damage, why):
    damaged_copy(s3, keys, f"read-{damage}", damage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = RemoteCache(f"s3://{BUCKET}/read-{damage}")
        found = cache.get_many({keys["add1"]: ADD1, keys["scale"]: "scale [cpu:x86-64-v2]"})
    assert list(found) == [keys["scale"]] and not cache.off
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and ADD1 in messages[0] and why in messages[0], messages


def test_a_poisoned_remote_entry_never_reaches_the_bundle_and_is_overwritten(
        s3, cold, keys, specs, tmp_path):
    good = damaged_copy(s3, keys, "poisoned", "flip")
    url = f"s3://{BUCKET}/poisoned"
    result, warned = build(specs, tmp_path / "out", tmp_path / "local", url, "readwrite")
    assert (result.compiled, result.remote_hits, result.uploaded) == (1, 1, 1)
    assert len(warned) == 1 and ADD1 in warned[0] and "this build overwrites it" in warned[0]
    assert tree(result.path) == tree(cold[0].path)
    record = json.loads(s3.objects("poisoned")["ac/" + keys["add1"]])
    assert s3.objects("poisoned")["cas/" + record["sha256"]] == good


def test_the_server_stopped_mid_build_leaves_one_warning_and_a_local_build(
        s3, cold, keys, specs, tmp_path, monkeypatch):
    """A second server (moto's state is per process: it holds the same bucket) is stopped once
    the lookups are done, before the upload of the local hits it lacks: the upload fails, the
    build completes from the local cache, nothing hangs."""
    other = S3()
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": other.endpoint})
    looked_up = RemoteCache.unshared

    def look_up_then_stop(self, entries):
        found = looked_up(self, entries)
        other.server.stop()
        return found

    monkeypatch.setattr(RemoteCache, "unshared", look_up_then_stop)
    local = local_with(cold, keys, tmp_path, ["add1", "scale"])
    url = f"s3://{BUCKET}/stopped"
    start = time.monotonic()
    result, warned = build(specs, tmp_path / "out", local, url, "readwrite")
    assert (result.compiled, result.cached, result.remote_hits, result.uploaded) == (0, 2, 0, 0)
    assert len(warned) == 1 and "is off for the rest of this build" in warned[0], warned
    assert tree(result.path) == tree(cold[0].path)
    # still down when the next build starts: the command line prints one warning line
    r = subprocess.run([sys.executable, "-m", "fusebuild", "compile", str(specs), "-o",
                        str(tmp_path / "out"), "--cache-dir", str(local), "--cache-url", url,
                        "--cache-mode", "readwrite", "--json"], capture_output=True, text=True,
                       env={**os.environ, "FSSPEC_S3_ENDPOINT_URL": other.endpoint}, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["cached"] == 2, r.stderr
    assert r.stderr.startswith(f"fusebuild: warning: shared cache {url} is off for the rest of "
                               "this build: Could not connect") and r.stderr.count("\n") == 1
    assert time.monotonic() - start < 120


def test_a_server_that_never_answers_times_out_and_turns_the_cache_off(s3, keys, monkeypatch):
    """A listening socket that accepts nothing: the request times out (fsspec's config here
    shortens the read timeout and the tries, as a user's would), and later reads do not wait."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()
        monkeypatch.setitem(fsspec.config.conf, "s3", {
            "endpoint_url": f"http://127.0.0.1:{stalled.getsockname()[1]}",
            "config_kwargs": {"read_timeout": 0.5, "retries": {"max_attempts": 1}}})
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = RemoteCache(MAIN)
            found = cache.get_many({keys["add1"]: ADD1})
    assert cache.off and found == {} and time.monotonic() - start < 30
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "is off for the rest of this build: Read timeout" in \
        messages[0], messages


def test_read_only_credentials_with_readwrite_warn_once_and_build(s3, cold, keys, specs,
                                                                  tmp_path, monkeypatch):
    """moto's IAM: a user allowed s3:GetObject and s3:ListBucket only, with authentication on
    (INITIAL_NO_AUTH_ACTION_COUNT 0, through moto's reset-auth endpoint) for this test."""
    iam = boto3.client("iam", endpoint_url=s3.endpoint)
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    local = local_with(cold, keys, tmp_path, ["add1", "scale"])
    requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"0")
    try:
        result, warned = build(specs, tmp_path / "out", local, f"s3://{BUCKET}/ro", "readwrite")
        served, _ = build(specs, tmp_path / "out2", tmp_path / "empty", MAIN)   # reads work
    finally:
        requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"inf")
    assert (result.cached, result.uploaded) == (2, 0)
    assert len(warned) == 1 and "no write access (Access Denied)" in warned[0], warned
    assert tree(result.path) == tree(cold[0].path)
    assert served.remote_hits == 2 and tree(served.path) == tree(cold[0].path)


def test_a_bucket_or_folder_that_does_not_exist_is_a_usage_error(s3, specs, tmp_path):
    """A mistyped bucket fails loudly before anything is compiled (a warning would leave every
    build cold without anyone noticing); FUSEBUILD_CACHE_URL is the option's variable."""
    r = subprocess.run([sys.executable, "-m", "fusebuild", "compile", str(specs), "-o",
                        str(tmp_path / "out"), "--cache-mode", "readwrite"],
                       env={**os.environ, "FUSEBUILD_CACHE_URL": "s3://no-such-bucket/cache"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "fusebuild: shared cache s3://no-such-bucket/cache: bucket 'no-such-bucket' does not "
        "exist (create it, or check --cache-url)"], r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="bucket 'no-such-bucket' does not exist"):
        RemoteCache("s3://no-such-bucket/cache", "read")
    with pytest.raises(UsageError, match=f"folder {tmp_path}/missing does not exist"):
        RemoteCache(f"file://{tmp_path}/missing", "readwrite")


def test_a_missing_s3fs_is_a_usage_error_naming_the_extra():
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from fusebuild.remote_cache import RemoteCache\n"
            "try:\n    RemoteCache('s3://bucket/cache')\n"
            "except Exception as e:\n    print(type(e).__name__, e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == ("UsageError --cache-url s3:// needs s3fs, which is not installed: "
                                "pip install 'fusebuild[distributed]'"), r.stdout + r.stderr


def test_a_file_cache_shared_by_two_concurrent_builds(cold, keys, specs, tmp_path):
    """Two processes upload the same entries at about the same time (their local hits, which
    the other may have uploaded first: the race without the cost of compiling twice); the folder
    holds one good copy of each."""
    shared = tmp_path / "shared"
    shared.mkdir()
    url = f"file://{shared}"
    for i in range(2):
        shutil.copytree(cold[2], tmp_path / f"l{i}")
    procs = [subprocess.Popen([sys.executable, "-m", "fusebuild", "compile", str(specs), "-o",
                               str(tmp_path / f"out{i}"), "--cache-dir", str(tmp_path / f"l{i}"),
                               "--cache-url", url, "--cache-mode", "readwrite", "-j", "1",
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    uploaded = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and not err, err
        uploaded.append(json.loads(out)["uploaded"])
    assert sum(uploaded) >= 2, uploaded
    files = sorted(os.path.relpath(os.path.join(f, n), shared)
                   for f, _, names in os.walk(shared) for n in names)
    assert len(files) == 4 and not [f for f in files if ".tmp-" in f], files
    assert {f for f in files if f.startswith("ac/")} == {f"ac/{k}" for k in keys.values()}
    result, warned = build(specs, tmp_path / "out", tmp_path / "empty", url)
    assert (result.compiled, result.remote_hits) == (0, 2) and not warned
    assert tree(result.path) == tree(cold[0].path)


def test_cache_stats_and_prune_least_recently_used_first(cold, keys, tmp_path):
    local = local_with(cold, keys, tmp_path, ["add1", "scale"])
    used, old = (Cache(str(local))._path(keys[g]) for g in ("add1", "scale"))
    os.utime(used, (1, 1))                             # used long ago ...
    os.utime(old, (2, 2))
    assert Cache(str(local)).get(keys["add1"]) is not None   # ... and again now
    new_size = os.path.getsize(used)

    def cli(*args):
        return CliRunner().invoke(main, ["cache", *args, "--cache-dir", str(local)])

    r = cli("stats")
    assert r.exit_code == 0 and r.stdout.startswith(f"{local}: 2 entries, "), r.output
    r = cli("prune", "--max-size", str(new_size))
    assert r.exit_code == 0 and "removed 1 entry" in r.stdout and "; 1 entry" in r.stdout
    assert not os.path.exists(old) and Cache(str(local)).stats() == (1, new_size)
    r = cli("prune", "--max-size", "2X")
    assert r.exit_code == 2 and "e.g. 500M or 2G" in r.output
