"""The build engine: cache, reproducibility, failures, timeouts, shards and merge, archives,
verify and inspect, and faults (kill -9 mid-build, concurrent builds)."""
from __future__ import annotations

import filecmp
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from fusebuild import build as fb_build, bundle, runtime, spec
from fusebuild.errors import BuildError, BundleError
from fusebuild.runtime.cpu import host_isas
from fusebuild.verify import verify
from conftest import no_lld

SPEC = """fusebuild: 1
bundle: {name: eng, version: "1.0"}
targets: [cpu:x86-64-v2]
groups:
  - name: axpy
    inputs: {x: tensor, y: tensor, a: scalar(float32)}
    outputs: [z]
    body: 'z = a * x + y'
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [N], y: [N]}, {x: [B, C], y: [C]}]}
  - name: gate
    inputs: {h: tensor}
    outputs: [y]
    body: |
      a, b = chunk(h, 2, dim=-1)
      y = BODY
    matrix: {dtype: [float32, float16], shapes: [{h: [T, 2*F]}]}
  - name: noise
    inputs: {x: tensor}
    outputs: [y, m]
    body: |
      m = rand_like(x) < 0.5
      y = where(m, x, 0.0)
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
"""


def write_spec(path, body="silu(a) * b", targets="[cpu:x86-64-v2]"):
    path.mkdir(exist_ok=True)
    (path / "s.yaml").write_text(SPEC.replace("BODY", body).replace("[cpu:x86-64-v2]", targets))
    return path


def plan_of(path, **kw):
    return spec.load_plan([str(path)], **kw)


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fusebuild", *args], capture_output=True,
                          text=True, **kw)


def same_tree(a, b) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(os.path.join(a, d), os.path.join(b, d))
                                               for d in cmp.common_dirs)


@pytest.fixture
def specs(tmp_path):
    return write_spec(tmp_path / "specs")


def test_cache_hits_and_corrupt_entries_are_misses(specs, tmp_path):
    cache = str(tmp_path / "cache")
    first = fb_build.build(plan_of(specs), str(tmp_path / "a"), cache_dir=cache, progress=False)
    assert (first.compiled, first.cached) == (3, 0)
    again = fb_build.build(plan_of(specs), str(tmp_path / "a"), cache_dir=cache, progress=False)
    assert (again.compiled, again.cached, again.up_to_date) == (0, 3, True)
    entries = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(entries) == 3
    entries[0].write_bytes(entries[0].read_bytes()[:100])          # truncated
    data = bytearray(entries[1].read_bytes())
    data[-10] ^= 0xFF                                               # flipped payload byte
    entries[1].write_bytes(bytes(data))
    third = fb_build.build(plan_of(specs), str(tmp_path / "b"), cache_dir=cache, progress=False)
    assert (third.compiled, third.cached) == (2, 1)
    assert third.manifest["id"] == first.manifest["id"]
    assert same_tree(first.path, third.path)


def test_modules_are_cached_apart_from_the_other_targets_of_a_build(specs, tmp_path):
    """A module's cache key holds its own toolchain only: x86-64 modules built beside aarch64
    and CUDA ones (ld.lld and NVRTC versions in the build's toolchain) serve an x86-only build."""
    if no_lld():
        pytest.skip(no_lld())
    cache = str(tmp_path / "cache")
    mixed = plan_of(specs, targets=["cpu:x86-64-v2", "cpu:armv8.2-a", "cuda:sm_80"])
    first = fb_build.build(mixed, str(tmp_path / "a"), cache_dir=cache, progress=False)
    assert {"ld.lld", "nvrtc", "cc"} <= set(first.manifest["toolchain"])
    alone = fb_build.build(plan_of(specs, targets=["cpu:x86-64-v2"]), str(tmp_path / "b"),
                           cache_dir=cache, progress=False)
    assert (alone.compiled, alone.cached) == (0, 3)
    assert set(alone.manifest["toolchain"]) == {"fusebuild", "numba", "llvmlite", "cc"}


def test_no_cache_writes_nothing(specs, tmp_path):
    r = run("compile", str(specs), "-o", str(tmp_path / "o"), "--no-cache", "--cache-dir",
            str(tmp_path / "c"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["compiled"] == 3 and not (tmp_path / "c").exists()


def test_two_cold_builds_are_byte_identical(specs, tmp_path):
    a = fb_build.build(plan_of(specs), str(tmp_path / "a"), jobs=1, cache_dir=None, progress=False)
    b = fb_build.build(plan_of(specs), str(tmp_path / "b"), jobs=2, cache_dir=None, progress=False)
    assert a.manifest["id"] == b.manifest["id"]
    assert same_tree(a.path, b.path)
    text = (tmp_path / "a" / "eng-1.0" / "manifest.json").read_text()
    host = os.uname().nodename
    for leak in [str(tmp_path), "mtime", "timestamp"] + ([f'"{host}"'] if host else []):
        assert leak not in text


def fake_cc(tmp_path, script):
    cc = tmp_path / "fake-cc"
    cc.write_text("#!/bin/sh\n" + script + "\n")
    cc.chmod(0o755)
    return str(cc)


def test_failures_keep_going_and_leave_the_previous_bundle(specs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    good = fb_build.build(plan_of(specs), str(out), progress=False)     # test cache
    write_spec(specs, body="a * b")
    monkeypatch.setenv("CC", fake_cc(tmp_path, "[ \"$1\" = --version ] && exec echo fake 1\n"
                                          "echo 'ld: cannot find -lm' >&2; exit 1"))
    with pytest.raises(BuildError) as info:
        fb_build.build(plan_of(specs), str(out), cache_dir=None, keep_going=True, progress=False)
    text = str(info.value)
    assert "3 compile job(s) failed" in text
    for g in ("axpy", "gate", "noise"):
        assert f"{g} [cpu:x86-64-v2]" in text
    assert "cannot find -lm" in text
    assert runtime.load(good.path).id == good.manifest["id"]


def test_job_timeout_kills_the_job(specs, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", fake_cc(tmp_path, '[ "$1" = --version ] && exec echo fake 1; sleep 60'))
    start = time.monotonic()
    with pytest.raises(BuildError, match=r"timed out after 2 s"):
        fb_build.build(plan_of(specs), str(tmp_path / "o"), cache_dir=None, job_timeout=2,
                       progress=False)
    assert time.monotonic() - start < 30


def test_shards_merge_into_the_unsharded_bundle(specs, tmp_path):
    whole = fb_build.build(plan_of(specs, targets=["cpu"]), str(tmp_path / "whole"),
                           cache_dir=None, emit_source=True, progress=False)
    paths = []
    for i in range(3):
        r = run("compile", str(specs), "--target", "cpu", "--shard", f"{i + 1}/3", "--emit-source",
                "-o", str(tmp_path / "shards"), "--no-cache")
        assert r.returncode == 0 and r.stdout.startswith(f"shard {i + 1}/3"), r.stderr
        paths.append(str(tmp_path / "shards" / f"eng-1.0.shard-{i + 1}-of-3"))
    r = run("merge", *paths, "-o", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    merged = tmp_path / "merged" / "eng-1.0"
    assert json.loads((merged / "manifest.json").read_text())["id"] == whole.manifest["id"]
    assert same_tree(whole.path, str(merged))
    r = run("merge", paths[0], paths[0], paths[1], paths[2], "-o", str(tmp_path / "m2"))
    assert r.returncode == 1 and "overlapping shards" in r.stderr and "1/3" in r.stderr
    r = run("merge", paths[0], paths[1], "-o", str(tmp_path / "m3"))
    assert r.returncode == 1 and "missing shard(s) 3/3" in r.stderr


def test_inconsistent_shards_are_refused_saying_why(specs, tmp_path, monkeypatch):
    a = fb_build.build(plan_of(specs), str(tmp_path / "s"), shard=(0, 2), progress=False)
    write_spec(specs, body="a * b")
    b = fb_build.build(plan_of(specs), str(tmp_path / "t"), shard=(1, 2), progress=False)
    with pytest.raises(BundleError, match=r"different builds: specs differ in group\(s\) gate"):
        bundle.merge_shards([a.path, b.path], str(tmp_path / "m"))
    real = fb_build.toolchain_versions
    monkeypatch.setattr(fb_build, "toolchain_versions", lambda t: {**real(t), "numba": "0.0.1"})
    c = fb_build.build(plan_of(specs), str(tmp_path / "u"), cache_dir=None, shard=(0, 2),
                       progress=False)
    with pytest.raises(BundleError, match=r"toolchains differ: numba 0.0.1 vs"):
        bundle.merge_shards([c.path, b.path], str(tmp_path / "m"))


def test_pack_is_deterministic_and_loads(specs, tmp_path):
    built = fb_build.build(plan_of(specs), str(tmp_path / "o"), cache_dir=None, progress=False)
    r1 = run("pack", built.path, "-o", str(tmp_path / "a.tar.gz"))
    r2 = run("pack", built.path, "-o", str(tmp_path / "b.tar.gz"))
    assert r1.returncode == r2.returncode == 0, r1.stderr
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    k = runtime.load(str(tmp_path / "a.tar.gz"))
    assert k.id == built.manifest["id"]
    x = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(k.axpy(x, x, 2.0), 3 * x)
    assert verify(str(tmp_path / "a.tar.gz")).bundle_id == built.manifest["id"]


def _archive(tmp_path, members):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("members,message", [
    ([("/abs/manifest.json", "f", b"{}")], "unsafe member path"),
    ([("b/../../x", "f", b"x"), ("b/manifest.json", "f", b"{}")], "unsafe member path"),
    ([("b/link", "sym", b""), ("b/manifest.json", "f", b"{}")], "link or special file"),
    ([("b/x", "f", b"x")], "the first file is not b/manifest.json"),
    ([("b/manifest.json", "f", json.dumps({"id": "ab", "artifacts": {}}).encode())],
     "not a fusebuild manifest"),
    ([("b/manifest.json", "f", bundle.manifest_bytes(bundle.make_manifest(
        "b", "1", {}, {}, {"cpu/x.so": b"x"}, []))), ("b/cpu/x.so", "f", b"toolong")],
     "has 7 bytes, the manifest says 1"),
])
def test_unsafe_archives_are_refused(tmp_path, members, message):
    with pytest.raises(BundleError, match=message):
        runtime.load(_archive(tmp_path, members))


def test_verify_inspect_and_flipped_bytes(specs, tmp_path):
    built = fb_build.build(plan_of(specs), str(tmp_path / "o"), cache_dir=None, progress=False)
    r = run("verify", built.path, "--numerics")
    assert r.returncode == 0 and "7 CPU kernels match the reference" in r.stdout, r.stdout + r.stderr
    r = run("inspect", built.path)
    assert r.returncode == 0 and "axpy(bf16:cc,bf16:bc)  cpu:x86-64-v2" in r.stdout
    r = run("inspect", built.path, "gate(f16:sc)")
    assert r.returncode == 0 and "def k0(P, M, start, stop):" in r.stdout and "ld_u16" in r.stdout
    r = run("inspect", built.path, "gate(f16:ss)")
    assert r.returncode == 1 and r.stderr == "fusebuild: the bundle has no kernel gate(f16:ss); " \
        "nearest keys present: gate(f16:sc), gate(f32:sc)\n", r.stderr
    r = run("inspect", built.path, "gate(f16:sc")
    assert r.returncode == 1 and "malformed key 'gate(f16:sc'" in r.stderr, r.stderr
    so = os.path.join(built.path, "cpu", "x86-64-v2", "gate.so")
    data = bytearray(open(so, "rb").read())
    data[len(data) // 3] ^= 0x10
    open(so, "wb").write(bytes(data))
    r = run("verify", built.path)
    assert r.returncode == 1 and "gate.so is corrupt or tampered" in r.stderr


def test_kill_9_mid_build_leaves_old_or_new_complete_bundle(specs, tmp_path):
    out = tmp_path / "out"
    old = fb_build.build(plan_of(specs), str(out), cache_dir=None, progress=False).manifest["id"]
    write_spec(specs, body="a * sigmoid(b)", targets="[cpu]")
    rnd = random.Random(4)
    seen = set()
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "fusebuild", "compile", str(specs), "-o",
                                 str(out), "--no-cache", "-j", "2"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.3, 4.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.add(verify(str(out / "eng-1.0")).bundle_id)      # intact, whichever it is
    new = fb_build.build(plan_of(specs), str(out), cache_dir=None, progress=False).manifest["id"]
    assert seen <= {old, new}
    assert verify(str(out / "eng-1.0")).bundle_id == new
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.mark.isa
def test_concurrent_builds_into_one_output_and_cache(specs, tmp_path):
    args = ["compile", str(specs), "-o", str(tmp_path / "out"), "--cache-dir",
            str(tmp_path / "cache"), "--target", "cpu", "-q"]
    procs = [subprocess.Popen([sys.executable, "-m", "fusebuild", *args], stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    report = verify(str(tmp_path / "out" / "eng-1.0"), numerics=True)
    # 7 kernels at each of the 3 levels; numerics run only at the levels this host runs
    assert report.symbols == 21 and report.numerics == 7 * len(host_isas())
    assert sum(report.skipped.values()) == 21 - report.numerics


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_only_the_cli_stops_its_workers(specs, tmp_path, sig):
    """kill -9 or SIGTERM (what `timeout` sends) to the CLI alone: its workers exit, and on
    SIGTERM the CLI says so without a traceback and the previous bundle stays."""
    out = tmp_path / "out"
    old = fb_build.build(plan_of(specs), str(out), progress=False).manifest["id"]  # test cache
    pids = tmp_path / "pids"
    # the fake linker records the worker that runs it ($PPID) and itself, then hangs
    cc = fake_cc(tmp_path, f'[ "$1" = --version ] && exec echo fake 1\n'
                           f'echo "$PPID $$" >> {pids}\nexec sleep 60')
    proc = subprocess.Popen([sys.executable, "-m", "fusebuild", "compile", str(specs), "-o",
                             str(out), "--no-cache", "-j", "2"], env={**os.environ, "CC": cc},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (pids.exists() and len(pids.read_text().splitlines()) == 2):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        lines = [line.split() for line in pids.read_text().splitlines()]
        workers = [int(w) for w, _ in lines]
        assert all(_alive(w) for w in workers)
        proc.send_signal(sig)
        code = proc.wait(30)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "compile workers outlived the CLI"
    finally:
        proc.kill()
        for line in pids.read_text().splitlines() if pids.exists() else []:
            try:
                os.kill(int(line.split()[1]), signal.SIGKILL)       # the hanging linkers
            except ProcessLookupError:
                pass
    if sig == signal.SIGTERM:
        err = proc.stderr.read()
        assert code == 128 + signal.SIGTERM and "fusebuild: terminated" in err, err
        assert "Traceback" not in err
    assert verify(str(out / "eng-1.0")).bundle_id == old
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_no_lock_file_and_stale_copies_are_removed_at_the_next_write(specs, tmp_path,
                                                                    monkeypatch):
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    fb_build.build(plan_of(specs), str(out), cache_dir=cache, progress=False)
    assert os.listdir(out) == ["eng-1.0"]
    write_spec(specs, body="a * b")
    with monkeypatch.context() as m:        # a kill between the swap and the cleanup
        m.setattr(bundle, "_discard", lambda path: None)
        new = fb_build.build(plan_of(specs), str(out), cache_dir=cache, progress=False)
    stale = [n for n in os.listdir(out) if n != "eng-1.0"]
    assert len(stale) == 1 and stale[0].startswith(".eng-1.0.")
    again = fb_build.build(plan_of(specs), str(out), cache_dir=cache, progress=False)
    assert again.up_to_date and again.manifest["id"] == new.manifest["id"]
    assert os.listdir(out) == ["eng-1.0"]


def run_read_only(directory: str, *args: str) -> subprocess.CompletedProcess:
    """`fusebuild ARGS` with `directory` read-only: a read-only bind mount in a private mount
    namespace as root (who may write through any mode bits), mode 0555 otherwise."""
    if os.geteuid():
        os.chmod(directory, 0o555)
        return run(*args)
    script = 'mount --bind -o ro "$0" "$0" || exit 99; exec "$@"'
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, directory, sys.executable, "-m",
                        "fusebuild", *args], capture_output=True, text=True)
    if r.returncode == 99:
        why = f"cannot mount {directory} read-only: {r.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must check read-only output directories: {why}")
        pytest.skip(why)
    return r


def test_a_read_only_output_directory_is_an_error_and_the_old_bundle_stays(specs, tmp_path):
    """Before the fix: an OSError traceback from tempfile.mkdtemp (compile) and mkstemp
    (pack)."""
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    old = fb_build.build(plan_of(specs), str(out), cache_dir=cache, progress=False)
    write_spec(specs, body="a * b")
    r = run_read_only(str(out), "compile", str(specs), "-o", str(out), "--cache-dir", cache)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"fusebuild: cannot write bundle {out / 'eng-1.0'}: " in r.stderr, r.stderr
    assert "Read-only file system" in r.stderr or "Permission denied" in r.stderr, r.stderr
    r = run_read_only(str(out), "pack", str(out / "eng-1.0"), "-o", str(out / "eng.tar.gz"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"fusebuild: cannot write archive {out / 'eng.tar.gz'}: " in r.stderr, r.stderr
    os.chmod(out, 0o755)
    assert verify(str(out / "eng-1.0")).bundle_id == old.manifest["id"]
    assert os.listdir(out) == ["eng-1.0"]


ERF_SPEC = """fusebuild: 1
bundle: {name: erfs, version: "1"}
groups:
  - name: e
    inputs: {x: tensor, s: scalar(float32)}
    outputs: [y]
    body: 'y = x + erf(s) + erfc(s) + gelu(s) + erf(0.5)'
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
"""


def test_verify_numerics_reports_skips_and_fails_when_nothing_ran(tmp_path):
    """Kernels verify cannot run are counted with the reason; checking none is a failure unless
    --allow-skip. (erf/erfc/gelu of a scalar once crashed the reference.)"""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "e.yaml").write_text(ERF_SPEC)
    cache = str(tmp_path / "cache")
    built = fb_build.build(plan_of(tmp_path / "s", targets=["cpu:x86-64-v2", "cpu:x86-64-v3",
                                                            "cuda:sm_80"]),
                           str(tmp_path / "a"), cache_dir=cache, progress=False)
    capped = {**os.environ, "FUSEBUILD_CPU_ISA": "x86-64-v2"}   # the same on any x86-64 host
    r = run("verify", built.path, "--numerics", env=capped)
    assert r.returncode == 0, r.stderr
    assert ("1 CPU kernel matches the reference; numerics skipped for 2 kernels (1 CUDA: "
            "numerics are checked on CPU kernels only; 1 x86-64-v3: this host runs only "
            "x86-64-v2)") in r.stdout
    x, s = np.linspace(-2, 2, 5, dtype=np.float32), 0.375       # an independent oracle
    f32 = np.float32
    erf = [f32(math.erf(v)) for v in (s, s / math.sqrt(2), 0.5)]
    gelu = f32(s) * f32(0.5) * (f32(1) + erf[1])
    want = x + erf[0] + f32(math.erfc(s)) + gelu + erf[2]
    np.testing.assert_allclose(runtime.load(built.path).e(x, s), want, rtol=2e-6, atol=1e-6)
    none = fb_build.build(plan_of(tmp_path / "s", targets=["cpu:x86-64-v3", "cuda:sm_80"]),
                          str(tmp_path / "b"), cache_dir=cache, progress=False)
    assert none.compiled == 0
    r = run("verify", none.path, "--numerics", env=capped)
    assert r.returncode == 1 and "--numerics checked no kernel" in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = run("verify", none.path, "--numerics", "--allow-skip", env=capped)
    assert r.returncode == 0 and "numerics skipped for 2 kernels" in r.stdout, r.stderr
