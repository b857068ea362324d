"""The explain-dataset flow end to end: Prefect (a real local server) + a local Dask cluster of
2 worker processes, the Zarr store and Parquet tables, resume after the whole run is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import SaliencyStore, open_run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_weights


def shapcam_run(tmp_path: Path, run_id: str, *extra: str, api: str | None = None
                ) -> subprocess.Popen:
    """``shapcam run`` in a subprocess: against ``api`` (a Prefect API URL), else with a
    local server of its own."""
    cmd = [sys.executable, "-c", "from flows.cli import app; app()", "run",
           "--root", str(tmp_path / "data"), "--store", str(tmp_path / "runs"),
           "--run-id", run_id, "--workers", "2", "--no-causal", *extra]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    if api is not None:
        env["PREFECT_API_URL"] = api
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


async def _tasks_of_latest(flow_run_name: str, api: str) -> list[str]:
    """The task run names of the newest flow run called ``flow_run_name`` on ``api``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            runs = [r for r in await client.read_flow_runs() if r.name == flow_run_name]
            latest = max(runs, key=lambda r: r.created)
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[latest.id])))
    return sorted(t.name for t in tasks)


FAST = ("--methods", "gradcam,shapcam", "--set", "shapcam.permutations=16", "--shard-size",
        "3")


@pytest.mark.slow
def test_flow_on_local_server_and_dask_workers(mobilenet, tmp_path, shared_api):
    # Tasks ask for GPU=1, as CUDA tasks do: the local workers declare it, so they run.
    proc = shapcam_run(tmp_path, "r1", *FAST, "--task-resources", "GPU=1", api=shared_api)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "Prefect UI: http://127.0.0.1:" in out and "| metric | Grad-CAM | Shap-CAM |" in out
    run_dir = tmp_path / "runs" / "r1"
    st = SaliencyStore(run_dir)
    assert st.shard_status("sample", "mobilenet_v2") == {0: True, 1: True}
    run = open_run(run_dir)
    assert len(run.metrics()) == 12
    manifest = run.sql("select status, shards_done, images from manifest")
    assert manifest.to_dict("records") == [{"status": "completed", "shards_done": 2,
                                            "images": 6}]
    assert (run_dir / "report.html").stat().st_size > 10_000
    # The same metrics as the plain loop on the same images and settings.
    import torch

    from shapcam.data import open_dataset
    from shapcam.evaluation.evaluate import evaluate_records

    records = open_dataset("sample", tmp_path / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (--threads 1): the same float arithmetic
    try:
        plain = evaluate_records(mobilenet, records, ["gradcam", "shapcam"], batch_images=3,
                                 method_options={"shapcam": {"permutations": 16}},
                                 causal=False)
    finally:
        torch.set_num_threads(threads)
    df = run.metrics()
    for row in plain:
        got = df[(df["method"] == row.method) & (df["image_id"] == row.image_id)].iloc[0]
        assert got["avg_drop"] == pytest.approx(row.avg_drop, rel=1e-5, abs=1e-6)
    workers = {st.shard_record("sample", "mobilenet_v2", k)["worker"] for k in (0, 1)}
    assert all(w.startswith("tcp://127.0.0.1:") for w in workers)
    # Re-running the same run id recomputes nothing, and submits no task: the flow knows
    # the done shards before it submits.
    records_before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "shards").rglob("*.json")}
    proc = shapcam_run(tmp_path, "r1", *FAST, "--task-resources", "GPU=1", api=shared_api)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "tasks: none to run (2 of 2 shards were already done)" in out, out
    tasks = asyncio.run(_tasks_of_latest("explain sample (r1)", shared_api))
    assert tasks == [], tasks  # before: one task run per shard, each only skipping
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "shards").rglob("*.json")}
    assert after == records_before
    # Another protocol variant from the stored maps, next to the first one.
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO),
           "PREFECT_API_URL": shared_api}
    out = subprocess.run([sys.executable, "-c", "from flows.cli import app; app()",
                          "evaluate-store", str(run_dir), "--protocol", "gradcampp",
                          "--no-causal", "--workers", "2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "protocol `gradcampp`" in out.stdout
    counts = run.sql("select protocol, count(*) as n from metrics group by protocol "
                     "order by protocol")
    assert counts.to_dict("records") == [{"protocol": "gradcampp", "n": 12},
                                         {"protocol": "scorecam", "n": 12}]
    assert sorted(p.name for p in run_dir.glob("summary-*.parquet")) == [
        "summary-gradcampp.parquet", "summary-scorecam.parquet"]
    # The report command rewrites report.html from the store alone.
    from typer.testing import CliRunner

    from flows.cli import app

    (run_dir / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(run_dir), "--protocol", "gradcampp"])
    assert res.exit_code == 0, res.output
    assert (run_dir / "report.html").stat().st_size > 10_000


SLOW = ("--methods", "gradcam,rise", "--set", "rise.n_masks=150", "--shard-size", "1")


def _prefect_servers(home: Path) -> list:
    """The ``prefect server`` processes started for ``PREFECT_HOME=home``."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if "server" in cmd and any("prefect" in c for c in cmd) and \
                    p.environ().get("PREFECT_HOME") == str(home):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _metrics(run_dir: Path):
    df = open_run(run_dir).metrics(columns=["method", "image_id", "avg_drop", "target"])
    return df.sort_values(["method", "image_id"]).reset_index(drop=True)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(mobilenet, tmp_path):
    proc = shapcam_run(tmp_path, "killed", *SLOW)
    shards = tmp_path / "runs" / "killed" / "shards" / "sample" / "mobilenet_v2"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = list(shards.glob("*.json")) if shards.is_dir() else []
        if 1 <= len(done) < 6:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    servers = _prefect_servers(tmp_path / "prefect")
    assert servers, "the run's local Prefect server is not running"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Dask workers: no cleanup code runs
    proc.wait(timeout=30)
    # The server has its own session (Ctrl-C goes to the CLI), so the kill did not reach it;
    # it must still die with the CLI (a parent-death signal), not run on forever.
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != "zombie" for p in servers):
        assert time.monotonic() < deadline, "the Prefect server outlived the killed run"
        time.sleep(0.5)
    completed = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.json")}
    assert 1 <= len(completed) < 6
    status = SaliencyStore(tmp_path / "runs" / "killed").shard_status("sample", "mobilenet_v2")
    assert not all(status.values())
    proc = shapcam_run(tmp_path, "killed", *SLOW)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    for name, mtime in completed.items():  # completed shards were not recomputed
        assert (shards / name).stat().st_mtime_ns == mtime
    proc = shapcam_run(tmp_path, "fresh", *SLOW)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    a, b = _metrics(tmp_path / "runs" / "killed"), _metrics(tmp_path / "runs" / "fresh")
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert a["target"].tolist() == b["target"].tolist()
    assert a["avg_drop"].tolist() == pytest.approx(b["avg_drop"].tolist(), rel=1e-5, abs=1e-6)
    manifest = json.loads(open_run(tmp_path / "runs" / "killed").sql(
        "select status from manifest").to_json(orient="records"))
    assert manifest == [{"status": "completed"}]
