"""Clean stops and lost workers: SIGTERM/SIGINT end `shapcam run`, `distill` and `dashboard`
within 15 s with no process left, the flow run is Cancelled (read back from a real Prefect
server, with the task logs that reached it from the Dask worker processes), rerunning the id
resumes, and a worker process killed in the middle of a task costs nothing but time."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from storage import SaliencyStore, open_run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_weights
SLOW = ("--methods", "gradcam,rise", "--set", "rise.n_masks=150", "--shard-size", "1",
        "--no-causal", "--workers", "2")


def _run(tmp_path: Path, run_id: str, api: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-cli"),
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "run", "--root",
         str(tmp_path / "data"), "--store", str(tmp_path / "runs"), "--run-id", run_id, *SLOW],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _shards(tmp_path: Path, run_id: str) -> int:
    folder = tmp_path / "runs" / run_id / "shards" / "sample" / "mobilenet_v2"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def _wait_for_shards(proc: subprocess.Popen, tmp_path: Path, run_id: str, n: int) -> None:
    deadline = time.monotonic() + 240
    while _shards(tmp_path, run_id) < n:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no shard finished"
        time.sleep(0.2)


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # already gone, or a zombie
        return ""


def _leave_work(tmp_path: Path, run_id: str, keep: int) -> int:
    """Tasks running at a stop may still finish during the cluster's shutdown, so on a fast
    machine few shards may be left to resume: forget the completion records beyond ``keep``
    (those shards are recomputed identically) so the next phase has work. Returns the count."""
    records = tmp_path / "runs" / run_id / "shards" / "sample" / "mobilenet_v2"
    while _shards(tmp_path, run_id) > keep:
        sorted(records.glob("*.json"))[-1].unlink()
    return _shards(tmp_path, run_id)


def _stop(proc: subprocess.Popen, sig: int) -> tuple[str, list[str]]:
    """Send ``sig`` to the command only (as a scheduler does); it must exit within 15 s and
    leave none of its descendants (Prefect server, Dask workers) behind. Returns the output
    and the descendants' command lines."""
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert descendants, "the command started no process?"
    cmdlines = [_cmdline(p) for p in descendants]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=15)
    _, alive = psutil.wait_procs(descendants, timeout=3)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"left behind: {[_cmdline(p)[:80] for p in alive]}"
    return out, cmdlines


async def _flow_run(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    async with get_client() as client:
        (run,) = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs = await client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return run, tasks, logs


@pytest.mark.slow
def test_a_stopped_run_is_cancelled_leaves_nothing_and_resumes(mobilenet, prefect_server,
                                                             tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = f"{prefect_server}/api"
    # 1. SIGTERM against a long-lived server: Cancelled, with the workers' task logs.
    proc = _run(tmp_path, "stopped", api)
    _wait_for_shards(proc, tmp_path, "stopped", 1)
    out, _ = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM: the flow run is marked Cancelled" in out
    assert "--run-id stopped" in out and "Traceback" not in out
    with temporary_settings({PREFECT_API_URL: api}):
        run, tasks, logs = asyncio.run(_flow_run("explain sample (stopped)"))
    assert run.state.is_cancelled(), run.state
    assert not [t.name for t in tasks if t.state.is_running() or t.state.is_pending()]
    lines = [log.message for log in logs]
    assert any(m.startswith("explain sample/mobilenet_v2 shard") and "images read" in m
               for m in lines), lines  # logged on a Dask worker process, shown in the UI
    assert _shards(tmp_path, "stopped") >= 1
    # 2. SIGINT (Ctrl-C) with a local server the command started: it goes too.
    done = _leave_work(tmp_path, "stopped", 3)
    proc = _run(tmp_path, "stopped")
    _wait_for_shards(proc, tmp_path, "stopped", done + 1)
    out, cmdlines = _stop(proc, signal.SIGINT)
    assert proc.returncode == 130, out
    assert any("prefect server start" in c for c in cmdlines)  # it ran, and it is gone
    # 3. Resume to the end while a Dask worker process is killed in the middle of a task.
    _leave_work(tmp_path, "stopped", 3)
    proc = _run(tmp_path, "stopped")
    _kill_a_busy_worker(proc)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    status = SaliencyStore(tmp_path / "runs" / "stopped").shard_status("sample", "mobilenet_v2")
    assert all(status.values())
    _equal_to_the_plain_loop(mobilenet, tmp_path, open_run(tmp_path / "runs" / "stopped"))


def _kill_a_busy_worker(proc: subprocess.Popen) -> None:
    """SIGKILL a Dask worker process while it computes (CPU-bound: inside a task)."""
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        try:  # children come and go (a resource tracker exits, a worker restarts)
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "spawn_main" in " ".join(p.cmdline())]
            busy = [w for w in workers if w.cpu_percent(interval=0.5) > 60] \
                if len(workers) == 2 else []
        except psutil.Error:
            continue
        if busy:
            busy[0].kill()
            return


def _equal_to_the_plain_loop(mobilenet, tmp_path: Path, run) -> None:
    """The results of the interrupted run equal an uninterrupted computation."""
    import torch

    from shapcam.data import open_dataset
    from shapcam.evaluation.evaluate import evaluate_records

    records = open_dataset("sample", tmp_path / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same float arithmetic
    try:
        plain = evaluate_records(mobilenet, records, ["gradcam", "rise"], batch_images=1,
                                 method_options={"rise": {"n_masks": 150}}, causal=False)
    finally:
        torch.set_num_threads(threads)
    df = run.metrics()
    assert len(df) == len(plain) == 12
    for row in plain:
        got = df[(df["method"] == row.method) & (df["image_id"] == row.image_id)].iloc[0]
        assert got["target"] == row.target
        assert got["avg_drop"] == pytest.approx(row.avg_drop, rel=1e-5, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_dashboard_stops_with_its_server(tmp_path, sig):
    (tmp_path / "runs").mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "dashboard", "--runs",
         str(tmp_path / "runs"), "--port", str(port), "--host", "0.0.0.0"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.5)
    out, _ = _stop(proc, sig)
    assert proc.returncode == 128 + sig, out
    assert "warning: the dashboard has no login" in out


@pytest.mark.slow
def test_distill_stops_cleanly(tmp_path):
    """`shapcam distill` goes through the same stop path: SIGTERM in the middle of the teacher's
    training, exit within 15 s, nothing left, a resume hint."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "distill", "--dataset",
         "digits", "--epochs", "20", "--variants", "ce", "--store", str(tmp_path / "runs"),
         "--run-id", "d", "--workers", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    epochs = tmp_path / "runs" / "d" / "training" / "config=teacher"
    deadline = time.monotonic() + 240
    while not (epochs.is_dir() and any(epochs.glob("*.parquet"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.5)
    out, _ = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out and "--run-id d" in out
