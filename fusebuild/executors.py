"""Where compile jobs run (DESIGN §11): the local worker pool (forked processes, a per-job
timeout), any `concurrent.futures.Executor`, or a Dask cluster.

Jobs and results are plain picklable data (`build.Job` in, `build.JobResult` out); a runner only
moves them and reports each result as it arrives. Dask is imported only when a Dask executor is
used (`connect`, or a `distributed` executor handed to `build`).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait

from . import build
from .build import Job, JobResult, RunStats
from .cache import code_fingerprint
from .errors import BuildError, FusebuildError, UsageError

ATTEMPTS = 2                # a job that fails on this many workers is a build error

Work = Callable[[Job], JobResult]


def _run(job: Job) -> JobResult:
    """`build.run_job`, looked up at call time (a stand-in set on the module is what runs)."""
    return build.run_job(job)


# ---------------------------------------------------------------- the local pool ---------------

def _serve(conn, parent_pid: int, inherited: list, work: Work) -> None:
    """Worker process loop: receive jobs, send results, stop at None or a closed pipe.

    `inherited` are the pipe ends of the parent (this worker's and its siblings') that the fork
    copied: closing them lets a worker see EOF when the parent dies while it waits for a job.
    """
    _die_with_parent(parent_pid)
    for c in inherited:
        c.close()
    for sig in (signal.SIGINT, signal.SIGTERM):     # not the parent's handlers: die quietly
        signal.signal(sig, signal.SIG_DFL)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(work(job))


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG), even
    of SIGKILL, and exit now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


class LocalPool:
    """Worker processes that run jobs with a per-job timeout (a stuck worker is killed)."""

    def __init__(self, workers: int, timeout: float, work: Work = _run):
        # fork: workers need no re-import of the caller's __main__ and start fast; the parent
        # holds no compiler threads (tqdm's monitor thread is disabled).
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.ctx = multiprocessing.get_context(method)
        self.workers, self.timeout, self.work = workers, timeout, work
        self.stats = RunStats()
        self.idle: list = []
        self.busy: dict = {}

    def _spawn(self):
        parent, child = self.ctx.Pipe()
        inherited = [parent] + [c for _, c in self.idle] + list(self.busy)
        proc = self.ctx.Process(target=_serve, args=(child, os.getpid(), inherited, self.work),
                                daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def run(self, jobs: list[Job], keep_going: bool, on_result) -> list[JobResult]:
        for _ in range(max(1, min(self.workers, len(jobs)))):
            self.idle.append(self._spawn())
        self.stats.workers = {f"local:{i}" for i in range(len(self.idle))}
        queue, results = deque(jobs), []
        stop = False
        try:
            while (queue and not stop) or self.busy:
                while queue and self.idle and not stop:
                    proc, conn = self.idle.pop()
                    job = queue.popleft()
                    conn.send(job)
                    self.busy[conn] = (proc, job, time.monotonic())
                now = time.monotonic()
                left = min(t + self.timeout - now for _, _, t in self.busy.values())
                for conn in wait(list(self.busy), timeout=max(0.0, min(left, 1.0))):
                    proc, job, _ = self.busy.pop(conn)
                    try:
                        result = conn.recv()
                        self.idle.append((proc, conn))
                    except (EOFError, OSError):
                        proc.join(1)
                        result = JobResult(job.label, error=f"the compile worker died (exit code "
                                                             f"{proc.exitcode})")
                        self.idle.append(self._spawn())
                    results.append(result)
                    on_result(result)
                    stop = stop or (result.error is not None and not keep_going)
                for conn, (proc, job, started) in list(self.busy.items()):
                    if time.monotonic() - started > self.timeout:
                        proc.kill()
                        proc.join()
                        del self.busy[conn]
                        result = _timed_out(job, self.timeout)
                        results.append(result)
                        on_result(result)
                        self.idle.append(self._spawn())
                        stop = stop or not keep_going
        finally:
            self.close()
        return results

    def close(self) -> None:
        for proc, conn in self.idle + [(p, c) for c, (p, _, _) in self.busy.items()]:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
            proc.join(0.5)
            if proc.is_alive():
                proc.kill()
        self.idle, self.busy = [], {}


def _timed_out(job: Job, timeout: float) -> JobResult:
    return JobResult(job.label, error=f"timed out after {timeout:.0f} s (raise --job-timeout)")


# ---------------------------------------------------------------- any Executor -----------------

def _run_tagged(job: Job, work: Work = _run) -> tuple[JobResult, str]:
    """Run a job where an executor put it; (result, where: the Dask worker's address, else
    host:pid)."""
    where = f"{socket.gethostname()}:{os.getpid()}"
    if "distributed" in sys.modules:
        try:
            where = sys.modules["distributed"].get_worker().address
        except ValueError:          # not in a Dask worker
            pass
    return work(job), where


class FuturesRunner:
    """Jobs on a `concurrent.futures.Executor`: at most `slots` in flight, each abandoned past
    the timeout (counted from its submission: with `slots` no more than the executor's workers, a
    job starts when it is submitted). A job whose result is an error, or whose attempt raised,
    runs once more when the executor can put it on another worker (`ATTEMPTS` in all; a plain
    Executor cannot, the Dask adapter can)."""

    def __init__(self, executor: cf.Executor, slots: int, timeout: float, work: Work = _run):
        self.executor, self.slots, self.timeout, self.work = executor, slots, timeout, work
        self.stats = RunStats()

    def _submit(self, job: Job, avoid: frozenset[str]):
        return self.executor.submit(_run_tagged, job, self.work)

    def _wait(self, pending, timeout: float) -> set:
        return cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED).done

    def _other_worker(self, avoid: frozenset[str]) -> bool:
        """Whether a retry can run on a worker other than those in `avoid`."""
        return False

    def _check(self) -> None:
        """Raise BuildError when the jobs in flight can no longer run (no worker left)."""

    def _settled(self, futures: list) -> None:
        """Bookkeeping of finished futures before they are released."""

    def run(self, jobs: list[Job], keep_going: bool, on_result) -> list[JobResult]:
        queue = deque((job, 1, frozenset()) for job in jobs)      # job, attempt, failed on
        pending: dict = {}
        results: list[JobResult] = []
        stop = False
        try:
            while (queue and not stop) or pending:
                while queue and not stop and len(pending) < self.slots:
                    job, attempt, avoid = queue.popleft()
                    pending[self._submit(job, avoid)] = (job, attempt, avoid, time.monotonic())
                left = min(t + self.timeout for *_, t in pending.values()) - time.monotonic()
                done = self._wait(list(pending), max(0.0, min(left, 1.0)))
                self._settled(list(done))
                for future in done:
                    job, attempt, avoid, _ = pending.pop(future)
                    try:
                        result, where = future.result()
                        self.stats.workers.add(where)
                        avoid |= {where}
                    except Exception as e:  # noqa: BLE001 - the attempt's own failure
                        result = JobResult(job.label, error=f"{type(e).__name__}: {e}")
                    if result.error and attempt < ATTEMPTS and self._other_worker(avoid):
                        self.stats.retried += 1
                        queue.appendleft((job, attempt + 1, avoid))
                        continue
                    if result.error and attempt > 1:
                        result.error = f"failed on {attempt} workers; the last said:\n{result.error}"
                    results.append(result)
                    on_result(result)
                    stop = stop or (result.error is not None and not keep_going)
                for future, (job, *_, started) in list(pending.items()):
                    if time.monotonic() - started > self.timeout:
                        future.cancel()
                        del pending[future]
                        results.append(_timed_out(job, self.timeout))
                        on_result(results[-1])
                        stop = stop or not keep_going
                if pending:
                    self._check()
        finally:
            for future in pending:
                future.cancel()
        return results


# ---------------------------------------------------------------- Dask -------------------------

def worker_identity(targets: tuple[str, ...]) -> dict[str, str]:
    """What a worker must share with the client to build `targets`: fusebuild's code
    fingerprint and the toolchain versions (an error text when a toolchain is missing)."""
    try:
        return {"code": code_fingerprint(), **build.toolchain_versions(targets)}
    except FusebuildError as e:
        return {"error": str(e)}


def _difference(mine: dict[str, str], theirs) -> str:
    """Why a worker's identity is not the client's ('' when it is)."""
    if not isinstance(theirs, dict):
        return f"cannot check it: {type(theirs).__name__}: {theirs}"
    if "error" in theirs:
        return theirs["error"]
    def show(k: str, version) -> str:
        return str(version)[:12] if k == "code" and version else str(version or "missing")
    names = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    return ", ".join(f"{'fusebuild code' if k == 'code' else k} {show(k, theirs.get(k))} "
                     f"(here {show(k, mine.get(k))})" for k in names)


class DaskRunner(FuturesRunner):
    """Jobs on the workers of a `distributed.Client` whose code and toolchains are the
    client's; the others get no job and are named in the stats. A worker lost mid-job costs a
    retry (the scheduler runs the task again elsewhere); one job in flight per worker thread, so
    that the timeout runs from the start of a job."""

    def __init__(self, client, targets: tuple[str, ...], timeout: float, work: Work = _run):
        self.client, self.checked = client, 0.0
        mine = worker_identity(targets)
        if "error" in mine:
            raise BuildError(mine["error"])
        wait_s = connect_timeout()
        try:
            client.wait_for_workers(1, timeout=wait_s)
        except TimeoutError:
            raise BuildError(f"no Dask worker joined the scheduler at {client.scheduler.address} "
                             f"within {wait_s:.0f} s") from None
        theirs = client.run(worker_identity, targets, on_error="return")
        excluded = {w: why for w, i in sorted(theirs.items()) if (why := _difference(mine, i))}
        self.matching = sorted(set(theirs) - set(excluded))
        if not self.matching:
            raise BuildError(f"no Dask worker at {client.scheduler.address} runs this fusebuild "
                             "code and toolchain; refusing to build with them:\n" + "\n".join(
                                 f"  {w}: {why}" for w, why in excluded.items()))
        info = client.scheduler_info(n_workers=-1)["workers"]
        super().__init__(client, sum(info[w]["nthreads"] for w in self.matching if w in info),
                         timeout, work)
        self.stats.excluded = excluded

    def run(self, jobs: list[Job], keep_going: bool, on_result) -> list[JobResult]:
        try:
            return super().run(jobs, keep_going, on_result)
        except (OSError, cf.CancelledError) as e:      # the scheduler went away
            lines = str(e).splitlines() or [type(e).__name__]
            why = next((x.removeprefix("Message: ") for x in lines if x.startswith("Message: ")),
                       lines[0])
            raise BuildError(f"lost the Dask scheduler at {self.client.scheduler.address} "
                             f"mid-build: {why}") from None

    def _submit(self, job: Job, avoid: frozenset[str]):
        workers = [w for w in self.matching if w not in avoid] or self.matching
        return self.client.submit(_run_tagged, job, self.work, workers=workers,
                                  allow_other_workers=False, pure=False)

    def _wait(self, pending, timeout: float) -> set:
        from distributed import wait as dask_wait
        try:
            with self.client.as_current():
                return dask_wait(pending, timeout=timeout, return_when="FIRST_COMPLETED").done
        except TimeoutError:
            return set()

    def _alive(self) -> set[str]:
        return set(self.client.scheduler_info(n_workers=-1)["workers"]) & set(self.matching)

    def _other_worker(self, avoid: frozenset[str]) -> bool:
        return bool(self._alive() - avoid)

    def _check(self) -> None:
        if time.monotonic() - self.checked < 1.0:
            return
        self.checked = time.monotonic()
        if not self._alive():
            raise BuildError(f"every matching Dask worker left the scheduler at "
                             f"{self.client.scheduler.address} mid-build")

    def _settled(self, futures: list) -> None:
        def attempts(keys: list[str], dask_scheduler=None) -> int:
            """(On the scheduler, which need not have fusebuild: pickled by value.) Worker
            deaths the tasks `keys` lived through, each a rerun."""
            return sum(dask_scheduler.tasks[k].suspicious for k in keys
                       if k in dask_scheduler.tasks)
        if futures:
            self.stats.retried += self.client.run_on_scheduler(attempts, [f.key for f in futures])


def dask_address(spec: str) -> str:
    """'dask://HOST:PORT' -> 'tcp://HOST:PORT'."""
    host, _, port = spec.removeprefix("dask://").rpartition(":")
    if not spec.startswith("dask://") or not host or not port.isdigit():
        raise UsageError(f"--executor takes local or dask://HOST:PORT; got {spec!r}")
    return f"tcp://{host}:{port}"


def connect_timeout() -> float:
    """Seconds to reach a scheduler, and for its first worker to join: Dask's
    `distributed.comm.timeouts.connect` (30 s unless configured, e.g. with
    DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s)."""
    import dask
    from dask.utils import parse_timedelta
    return parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "seconds")


def connect(spec: str):
    """A `distributed.Client` of the scheduler `spec` names (dask://HOST:PORT); BuildError
    naming the address if it cannot be reached within `connect_timeout()`."""
    address = dask_address(spec)
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--executor dask://... needs Dask: pip install "
                         "'fusebuild[distributed]'") from None
    try:
        return Client(address, timeout=connect_timeout(), set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise BuildError(f"cannot reach the Dask scheduler at {spec}: {e}") from None


@contextlib.contextmanager
def executor_for(spec: str, fallback: str | None, warn: Callable[[str], None]):
    """The Executor that `--executor SPEC` names (None: the local pool), closed on exit; an
    unreachable scheduler is a BuildError, or a warning and the local pool with fallback
    'local'."""
    if spec == "local":
        yield None
        return
    try:
        client = connect(spec)
    except BuildError as e:
        if fallback != "local":
            raise
        warn(f"{e}; building locally (--executor-fallback local)")
        yield None
        return
    try:
        yield client.get_executor()
    finally:
        log = logging.getLogger("distributed.client")
        level = log.level
        log.setLevel(logging.CRITICAL)   # a client closed after losing its scheduler logs the
        try:                             # cancelled reconnection with a traceback
            client.close()
        finally:
            log.setLevel(level)


def runner_for(executor: cf.Executor | None, jobs: int, targets: tuple[str, ...],
               timeout: float):
    """The runner of `build`: the local pool of `jobs` processes (executor None), the Dask
    adapter for a `distributed` executor (`Client.get_executor()`: its client's workers are
    checked), else any Executor with `jobs` jobs in flight."""
    if executor is None:
        return LocalPool(jobs, timeout)
    client = getattr(executor, "_client", None)
    if type(executor).__module__.startswith("distributed.") and client is not None:
        return DaskRunner(client, targets, timeout)
    return FuturesRunner(executor, jobs, timeout)
