"""Scale-out builds on real Dask (DESIGN §11): a 2-process LocalCluster through the library, a
`dask scheduler` and `dask worker` processes through the CLI (a worker killed mid-build, a
worker running other fusebuild code), an unreachable scheduler, and Dask kept out of the plain
build. Every bundle is compared byte for byte with a local build of the same specs."""
from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from fusebuild import build as fb_build, spec
from fusebuild.errors import BuildError
from conftest import ROOT
from test_build_engine import fake_cc, same_tree

distributed = pytest.importorskip("distributed")

GROUPS = {"axpy": """
  - name: axpy
    inputs: {x: tensor, y: tensor, a: scalar(float32)}
    outputs: [z]
    body: 'z = a * x + y'
    matrix: {dtype: [float32, float16], shapes: [{x: [N], y: [N]}]}
""", "act": """
  - name: act
    inputs: {x: tensor}
    outputs: [y]
    body: 'y = silu(x)'
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
"""}
HEAD = "fusebuild: 1\nbundle: {name: dist, version: '1'}\ntargets: [cpu:x86-64-v2]\ngroups:"
QUICK_CONNECT = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}   # nothing listens there


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """Two one-group spec files of one bundle, and its local build (from the test cache)."""
    d = tmp_path_factory.mktemp("dist")
    for name, text in GROUPS.items():
        (d / "specs").mkdir(exist_ok=True)
        (d / "specs" / f"{name}.yaml").write_text(HEAD + text)
    local = fb_build.build(spec.load_plan([str(d / "specs")]), str(d / "local"), jobs=1,
                           progress=False)
    return d / "specs", local.path


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c
        # the workers' exit-time collection of what numba left takes seconds (4 s here, when
        # the nanny kills them): nothing is collected at exit, the processes just end
        c.run(gc.freeze)


def test_a_cluster_build_is_the_local_bundle_with_progress_and_counts(specs, client, tmp_path,
                                                                      capfd):
    path, local = specs
    plan = spec.load_plan([str(path)])
    result = fb_build.build(plan, str(tmp_path / "d"), cache_dir=None, progress=True,
                            executor=client.get_executor())
    bar = capfd.readouterr().err
    assert "0/2 modules, 0/3 kernels [00:00<?]" in bar, bar                  # elapsed<ETA
    assert re.search(r"[12]/2 modules, [1-3]/3 kernels \[\d\d:\d\d<\d\d:\d\d\]", bar), bar
    assert same_tree(result.path, local)
    assert (result.compiled, result.cached, result.retried, result.excluded) == (2, 0, 0, {})
    assert 1 <= result.workers <= 2
    assert "2 compiled on " in result.summary() and "0 retried" in result.summary()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:       # any Executor
        threads = fb_build.build(plan, str(tmp_path / "t"), cache_dir=None, progress=False,
                                 executor=pool)
    assert same_tree(threads.path, local) and threads.workers == 1


def test_a_job_that_fails_on_two_workers_is_a_build_error_with_its_log(specs, client, tmp_path,
                                                                       monkeypatch):
    """The fake linker reports the real cc's version, so the workers still match."""
    cc = fake_cc(tmp_path, '[ "$1" = --version ] && exec cc --version\n'
                           "echo 'ld: cannot find -lm' >&2; exit 1")
    monkeypatch.setenv("CC", cc)
    client.run(lambda: os.environ.update(CC=cc))
    try:
        with pytest.raises(BuildError) as info:
            fb_build.build(spec.load_plan([str(specs[0] / "act.yaml")]), str(tmp_path / "o"),
                           cache_dir=None, progress=False, executor=client.get_executor())
    finally:
        client.run(lambda: os.environ.pop("CC", None))
    text = str(info.value)
    assert "act [cpu:x86-64-v2]: failed on 2 workers" in text and "cannot find -lm" in text, text


def test_job_timeout_holds_on_a_cluster(specs, client, tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    cc = fake_cc(tmp_path, f'[ "$1" = --version ] && exec cc --version\necho $$ >> {pids}\n'
                           "exec sleep 60")
    monkeypatch.setenv("CC", cc)
    client.run(lambda: os.environ.update(CC=cc))
    start = time.monotonic()
    try:
        with pytest.raises(BuildError, match=r"act \[cpu:x86-64-v2\]: timed out after 2 s"):
            fb_build.build(spec.load_plan([str(specs[0] / "act.yaml")]), str(tmp_path / "o"),
                           cache_dir=None, progress=False, job_timeout=2,
                           executor=client.get_executor())
        assert time.monotonic() - start < 30
    finally:
        client.run(lambda: os.environ.pop("CC", None))
        for pid in pids.read_text().split() if pids.exists() else []:
            os.kill(int(pid), signal.SIGKILL)     # the hanging linker: its worker is free again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compile(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "fusebuild", "compile", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for_a_job(started, before: int, proc) -> None:
    """Until the fake linker has recorded more than `before` jobs (`proc` still running)."""
    deadline = time.monotonic() + 120
    while len(started.read_text().split() if started.exists() else []) <= before:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)


def test_cli_on_dask_processes_killed_worker_foreign_worker_lost_scheduler(specs, tmp_path):
    """A scheduler and three workers: two run this tree, one a copy of fusebuild with one
    edited file (another code fingerprint). One of the two is killed while it runs a job; the
    build still completes, byte-identical, and the foreign worker got no job and is named. With
    only the foreign worker left, the build is refused; with a new worker, a build that loses its
    scheduler is an error that says so."""
    path, local = specs
    alt = tmp_path / "alt"
    shutil.copytree(os.path.join(ROOT, "fusebuild"), alt / "fusebuild",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(alt / "fusebuild" / "text.py", "a") as f:
        f.write("# another build of fusebuild\n")
    started = tmp_path / "started"
    # the linker records the worker that runs it ($PPID), then takes a while
    cc = fake_cc(tmp_path, '[ "$1" = --version ] && exec cc --version\n'
                           f'echo $PPID >> {started}; sleep 1; exec cc "$@"')
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "CC": cc}
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stderr=subprocess.DEVNULL)]
    worker = ["dask", "worker", f"tcp://{address}", "--nthreads", "1", "--no-nanny",
              "--no-dashboard", "--host", "127.0.0.1"]
    try:
        for pythonpath in (ROOT, ROOT, str(alt)):
            procs.append(subprocess.Popen(worker, env={**env, "PYTHONPATH": pythonpath},
                                          stderr=subprocess.DEVNULL))
        with distributed.Client(f"tcp://{address}", timeout=30) as c:
            c.wait_for_workers(3, timeout=60)
            foreign = next(w for w, pid in c.run(os.getpid).items() if pid == procs[3].pid)
        build = _compile(str(path), "-o", str(tmp_path / "d"), "--no-cache", "--executor",
                         f"dask://{address}", "--json", env={"CC": cc})
        _wait_for_a_job(started, 0, build)
        victim = int(started.read_text().split()[0])
        assert victim in (procs[1].pid, procs[2].pid)
        os.kill(victim, signal.SIGKILL)
        out, err = build.communicate(timeout=120)
        assert build.returncode == 0, err
        summary = json.loads(out)
        assert same_tree(summary["bundle"], local)
        assert summary["retried"] >= 1 and summary["compiled"] == 2, summary
        assert list(summary["excluded_workers"]) == [foreign], summary
        assert "fusebuild code" in summary["excluded_workers"][foreign]
        assert procs[3].pid not in {int(p) for p in started.read_text().split()}
        survivor = procs[1] if victim == procs[2].pid else procs[2]
        survivor.kill()
        survivor.wait()
        refused = _compile(str(path), "-o", str(tmp_path / "e"), "--no-cache", "--executor",
                           f"dask://{address}", env={"CC": cc})
        _, err = refused.communicate(timeout=120)
        assert refused.returncode == 1 and "Traceback" not in err, err
        assert f"no Dask worker at tcp://{address} runs this fusebuild code and toolchain" in err
        assert f"{foreign}: fusebuild code" in err, err
        procs.append(subprocess.Popen(worker, env={**env, "PYTHONPATH": ROOT},
                                      stderr=subprocess.DEVNULL))
        with distributed.Client(f"tcp://{address}", timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        jobs = len(started.read_text().split())
        lost = _compile(str(path), "-o", str(tmp_path / "f"), "--no-cache", "--executor",
                        f"dask://{address}", env={"CC": cc})
        _wait_for_a_job(started, jobs, lost)
        procs[0].kill()
        _, err = lost.communicate(timeout=120)
        assert lost.returncode == 1 and "Traceback" not in err, err
        assert f"lost the Dask scheduler at tcp://{address} mid-build" in err, err
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()


def test_an_unreachable_scheduler_is_an_error_naming_it_unless_falling_back(specs, tmp_path):
    path, local = specs
    address = f"dask://127.0.0.1:{_free_port()}"
    r = _compile(str(path), "-o", str(tmp_path / "o"), "--executor", address, env=QUICK_CONNECT)
    _, err = r.communicate(timeout=60)
    assert r.returncode == 1 and "Traceback" not in err, err
    assert err.startswith(f"fusebuild: cannot reach the Dask scheduler at {address}: "), err
    r = _compile(str(path), "-o", str(tmp_path / "o"), "--executor", address,
                 "--executor-fallback", "local", "--json", env=QUICK_CONNECT)
    out, err = r.communicate(timeout=120)
    assert r.returncode == 0 and "building locally (--executor-fallback local)" in err, err
    assert same_tree(json.loads(out)["bundle"], local)
    r = _compile(str(path), "--executor", "dask:/nowhere")
    _, err = r.communicate(timeout=60)
    assert r.returncode == 2 and "--executor takes local or dask://HOST:PORT" in err, err


def test_the_plain_build_imports_no_dask(specs, tmp_path):
    code = ("import sys; from fusebuild import build, spec\n"
            f"build.build(spec.load_plan([{str(specs[0] / 'act.yaml')!r}]), {str(tmp_path)!r}, "
            "cache_dir=None, progress=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_dask_and_s3_together_give_the_local_bundle_and_a_fresh_machine_compiles_nothing(
        specs, client, tmp_path, monkeypatch):
    """Issue 21's "done when": `compile --executor dask://... --cache-url s3://... --cache-mode
    readwrite` on the cluster and moto's S3 writes the local build's bytes; a second build from
    an empty local cache compiles nothing (every module a remote hit), same bytes again."""
    pytest.importorskip("moto.server")
    from test_remote_cache import BUCKET, S3
    path, local = specs
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    server = S3()
    try:
        server.client.create_bucket(Bucket=BUCKET)
        env = {**os.environ, "PYTHONPATH": ROOT, "FSSPEC_S3_ENDPOINT_URL": server.endpoint}
        address = client.scheduler_info()["address"].removeprefix("tcp://")
        runs = []
        for name in ("ci", "fresh"):
            env["FUSEBUILD_CACHE_DIR"] = str(tmp_path / f"cache-{name}")   # empty each time
            proc = subprocess.run(
                [sys.executable, "-m", "fusebuild", "compile", str(path), "-o",
                 str(tmp_path / name), "--executor", f"dask://{address}", "--cache-url",
                 f"s3://{BUCKET}/dask", "--cache-mode", "readwrite", "--json"],
                capture_output=True, text=True, env=env, timeout=300)
            assert proc.returncode == 0, proc.stderr
            runs.append(json.loads(proc.stdout))
    finally:
        server.server.stop()
    ci, fresh = runs
    assert (ci["compiled"], ci["uploaded"], ci["remote_hits"]) == (2, 2, 0), ci
    assert (fresh["compiled"], fresh["remote_hits"], fresh["uploaded"]) == (0, 2, 0), fresh
    assert same_tree(ci["bundle"], local) and same_tree(fresh["bundle"], local)
