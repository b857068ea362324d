"""Prefect and Dask set-up, in one place: the environment, the local Prefect server, the API
context a command runs in (with clean stops, :mod:`flows.stops`), the Dask task runner, the GPU
annotation, artifact keys, run ids.

Nothing here imports Prefect at module level: :func:`prefect_environment` must run before Prefect
is first imported (it reads its settings then), and the command package calls it first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shapcam.errors import ShapCAMError
from storage.names import check_run_id
from tasks.config import device_resources

DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def prefect_environment(home: Path) -> None:
    """Project-local Prefect home, analytics off (the closed network would see refused calls).
    Values already in the environment win."""
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Task and flow logs at INFO go to the API (the UI's flow-run page; `tasks` is the task
    # functions' logger); the terminal shows warnings only, and run failures once, from the
    # command (see quiet_run_errors).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
    # the task functions also run outside flows (tests, notebooks): no API, no warning then
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ShapCAMError(f"the local Prefect server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ShapCAMError(f"the local Prefect server did not answer within {timeout}s; "
                               f"see {log}")
        time.sleep(0.5)


#: Run as ``python -c _ORPHAN_GUARD PARENT_PID CMD...``: ask Linux to send SIGTERM when the
#: parent dies (even by SIGKILL, which no cleanup code sees), then become CMD (the setting
#: survives exec); exit at once if the parent is already gone.
_ORPHAN_GUARD = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


def dies_with_this_process(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so that it is terminated when this process dies, however it dies (Linux;
    elsewhere ``cmd`` unchanged): a local server must not outlive a killed ``shapcam run``."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), *cmd]


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if ``proc`` has not exited within ``timeout`` seconds; a process
    started with ``start_new_session=True`` is stopped with its whole process group."""
    group = os.getpgid(proc.pid) == proc.pid if proc.poll() is None else False

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
    if group:  # children that outlived their parent
        send(signal.SIGKILL)


@contextlib.contextmanager
def local_prefect_server(timeout: float = 180.0) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1 (API and UI), yield its URL, stop it.

    Process workers cannot share Prefect's ephemeral mode (each would start its own server on
    one SQLite file), so a run with Dask worker processes talks to one real local server.
    """
    port = _free_port()
    env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port)}
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "ab")  # noqa: SIM115 - closed in finally
    # Its own session: Ctrl-C in the terminal reaches the command, which stops the run and
    # marks it Cancelled through this server before stopping it (with its process group).
    proc = subprocess.Popen(dies_with_this_process(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
         str(port)]), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log.name, timeout)
        yield url
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def prefect_api(announce: Callable[[str], None] = print) -> Iterator[str]:
    """PREFECT_API_URL, or a local server started for the occasion: yield the UI's base URL
    (announced) with Prefect's client settings pointing at it."""
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = (contextlib.nullcontext(os.environ["PREFECT_API_URL"])
              if os.environ.get("PREFECT_API_URL") else local_prefect_server())
    quiet_run_errors()
    with server as url:
        base = url.removesuffix("/api")
        announce(f"Prefect UI: {base}")
        # In the environment too: Dask worker processes started inside inherit it, so their
        # task logs reach the API (a setting alone stays in this process).
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = f"{base}/api"
        with temporary_settings({PREFECT_API_URL: f"{base}/api"}):
            try:
                yield base
            finally:
                _drain_api_logs()
                if previous is None:
                    os.environ.pop("PREFECT_API_URL", None)
                else:
                    os.environ["PREFECT_API_URL"] = previous


class _RunErrorsToTheApiOnly(logging.Filter):
    """Flow- and task-run errors (tracebacks, "Crash detected!") still reach the API and the
    UI, but not the terminal: the command reports a failed or stopped run once, itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR
                    and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))


def quiet_run_errors() -> None:
    """Add :class:`_RunErrorsToTheApiOnly` to Prefect's console handler (once)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _RunErrorsToTheApiOnly) for f in handler.filters):
            handler.addFilter(_RunErrorsToTheApiOnly())


def _drain_api_logs() -> None:
    """Send the logs still queued for the API before a local server goes away (otherwise
    Prefect prints "Error logging to API" after the command's own message)."""
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=5)


def run_flow(flow: Any, runner: Any, announce: Callable[[str], None] = print,
             **params: Any) -> Any:
    """Run ``flow`` on ``runner`` against PREFECT_API_URL, or a local server started for it.

    SIGTERM or SIGINT stops it cleanly (:mod:`flows.stops`): the flow run and its unfinished
    tasks are marked Cancelled, the Dask cluster and the local server are shut down, and
    :class:`~flows.stops.Stopped` is raised to the command.
    """
    from .stops import FlowRunRecorder, Stopped, cancel_flow_run, stop_signals

    recorder = FlowRunRecorder()
    with stop_signals(), prefect_api(announce):
        try:
            return flow.with_options(task_runner=runner, on_running=[recorder])(**params)
        except BaseException as exc:
            stop = exc if isinstance(exc, Stopped) else getattr(exc, "__context__", None)
            if not isinstance(stop, Stopped):
                raise
            if recorder.flow_run_id is not None:
                with contextlib.suppress(Exception):  # the stop matters more than the label
                    cancel_flow_run(recorder.flow_run_id, f"stopped by {stop.name}")
            raise stop from None


def task_runner(dask_address: str | None, workers: int, threads: int, *,
                device: str = "cpu", gpus: str | None = None,
                resources: dict[str, float] | None = None, tasks_per_gpu: int = 1) -> Any:
    """prefect-dask's runner: an existing scheduler, or a local cluster (:func:`local_cluster`):
    ``workers`` processes with ``threads`` torch threads each on CPU, one worker per GPU of
    ``gpus`` (default: every visible GPU) with CUDA, running ``tasks_per_gpu`` tasks at once.
    Local workers offer what their tasks ask for (``resources``, default per device), so the
    tasks run there by construction."""
    import dask
    from prefect_dask import DaskTaskRunner

    # A spilling worker keeps a `storage/` folder in its local directory, which Dask puts on
    # sys.path: with an editable install it would shadow this project's `storage` package as a
    # namespace package. Tasks return small summaries, so there is nothing worth spilling.
    dask.config.set({"distributed.worker.memory.spill": False,
                     "distributed.worker.memory.target": False})
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    devices = visible_gpus(gpus) if device.startswith("cuda") else None
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={
        "n_workers": workers, "threads": threads, "devices": devices,
        "resources": resources if resources is not None else device_resources(
            device, tasks_per_gpu), "tasks_per_device": tasks_per_gpu})


def visible_gpus(gpus: str | None = None) -> list[str]:
    """The CUDA devices of a local GPU cluster: ``gpus`` (``"0,1"``), else every device this
    process sees (the entries of ``CUDA_VISIBLE_DEVICES`` when it is set)."""
    if gpus is not None:
        chosen = [g.strip() for g in gpus.split(",") if g.strip()]
        if not chosen:
            raise ShapCAMError(f"--gpus {gpus!r}: give device indices, e.g. --gpus 0,1")
        return chosen
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ShapCAMError("--device cuda: no CUDA device is visible here "
                           "(torch.cuda.device_count() is 0); use --device cpu, or "
                           "--dask-address of a cluster whose workers have GPUs")
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def local_cluster(n_workers: int = DEFAULT_WORKERS, threads: int = 1,
                  devices: list[str] | None = None, resources: dict[str, float] | None = None,
                  tasks_per_device: int = 1, **kwargs: Any) -> Any:
    """A local Dask cluster of worker processes (nannies), one task at a time each on CPU.

    With ``devices``: one worker per device, pinned to it with ``CUDA_VISIBLE_DEVICES`` (it
    sees one GPU, ``cuda:0``) and named ``gpu-<device>`` -- what dask-cuda's
    ``LocalCUDACluster`` does, without its dependency -- with ``tasks_per_device`` threads,
    declaring what that many tasks ask for together (``resources`` x ``tasks_per_device``:
    ``GPU=1`` for tasks asking ``GPU=0.5`` two at a time). CPU workers declare ``resources``.
    """
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    pins: list[str | None] = list(devices) if devices else [None] * n_workers
    per_worker = tasks_per_device if devices else 1
    offered = {k: v * per_worker for k, v in (resources or {}).items()}
    # One malloc arena: tasks run on a worker *thread*, whose own glibc arena (64 MB heaps,
    # unmapped when empty) defeats shapcam.runtime.cpu.tune_allocator and page-faults every batch in
    # again: the same shards took 51 s instead of 33 s on the 2-core VM (docs/benchmarks.md).
    base = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "MALLOC_ARENA_MAX": "1"}
    workers = {}
    for i, dev in enumerate(pins):
        env = base | ({"CUDA_VISIBLE_DEVICES": dev} if dev is not None else {})
        workers[f"gpu-{dev}" if dev is not None else f"cpu-{i}"] = {"cls": Nanny, "options": {
            "nthreads": per_worker, "env": env, "resources": offered or None,
            "memory_limit": MEMORY_LIMIT // len(pins), "host": "127.0.0.1"}}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="shapcam-local", **kwargs)


def resource_annotation(resources: dict[str, float]) -> contextlib.AbstractContextManager[Any]:
    """Tasks submitted inside ask their Dask worker for ``resources`` (none: no annotation)."""
    if resources:
        import dask

        return dask.annotate(resources=dict(resources))
    return contextlib.nullcontext()


def require_resources(resources: dict[str, float], wait: float, poll: float = 1.0) -> int:
    """Inside a flow on a Dask runner: wait up to ``wait`` seconds for a worker that offers
    ``resources``, return how many do; none is an error naming the resource and the fix.

    Dask keeps a task that asks for a resource no worker has pending forever, silently.
    """
    if not resources:
        return 0
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    client = getattr(getattr(context, "task_runner", None), "client", None)
    if client is None:  # not on a Dask runner: nothing to check
        return 0
    deadline = time.monotonic() + wait
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        offering = [w for w in workers if all(
            (w.get("resources") or {}).get(k, 0) >= v for k, v in resources.items())]
        if offering or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    if offering:
        return len(offering)
    asked = ",".join(f"{k}={v:g}" for k, v in resources.items())
    seen = sorted({",".join(f"{k}={v:g}" for k, v in (w.get("resources") or {}).items())
                   or "none" for w in workers})
    name, amount = next(iter(resources.items()))
    threads = f" --nthreads {round(1 / amount)}" if amount < 1 else ""
    raise ShapCAMError(
        f"no Dask worker offers the resource {asked} that every task asks for "
        f"({len(workers)} worker(s) connected after {wait:.0f} s, offering: "
        f"{'; '.join(seen) or 'nothing'}); start the workers with `dask worker ADDRESS "
        f"--resources {name}={max(1, math.ceil(amount))}{threads}` (one per GPU), or ask for "
        "other resources with --task-resources (none: no resource)")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes), unique per ``parts``:
    the readable slug loses case and punctuation (``Run_1`` and ``run-1`` read alike), so a
    short hash of the exact parts follows it."""
    text = "-".join(parts)
    slug = "".join(c if c.isalnum() and c.isascii() else "-" for c in text.lower()).strip("-")
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:8]
    return f"{slug[:80].strip('-') or 'run'}-{digest}"


def new_run_id(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")


def run_dir_for(store: str, run_id: str) -> str:
    """``store/run_id`` for a folder (made absolute: Dask workers may run elsewhere) or URL;
    the run id is checked first (:func:`storage.check_run_id`)."""
    check_run_id(run_id)
    return (f"{store.rstrip('/')}/{run_id}" if "://" in store
            else str((Path(store) / run_id).resolve()))
