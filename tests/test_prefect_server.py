"""Against a real Prefect server started (and stopped) by the test: `shapcam serve` registers a
cron deployment, a run triggered from it completes, its state and artifacts are read back
through the Prefect client, and the Prefect UI shows it, with its task logs, in headless
Chromium."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import open_run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_weights


async def _wait_for_deployment(name: str, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            try:
                return await client.read_deployment_by_name(name)
            except Exception:  # noqa: BLE001 - not registered yet
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)


async def _read_back(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async with get_client() as client:
        parent = await client.read_flow_run(flow_run_id)
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        artifacts = await client.read_artifacts()
        tasks = await client.read_task_runs()
    return parent, children, artifacts, tasks


@pytest.mark.slow
def test_serve_schedules_a_deployment_whose_run_completes(prefect_server, tmp_path, browser,
                                                         screenshot_dir, clean_checkout):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = f"{prefect_server}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO)}
    serve = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "serve", "--name", "ci",
         "--cron", "30 3 * * 1", "--root", str(tmp_path / "data"), "--store",
         str(tmp_path / "runs"), "--methods", "gradcam,shapcam", "--set",
         "shapcam.permutations=16", "--no-causal", "--shard-size", "3", "--workers", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            dep = asyncio.run(_wait_for_deployment("scheduled-explain/ci", 120))
            assert [s.schedule.cron for s in dep.schedules] == ["30 3 * * 1"]
            assert dep.parameters["config"]["methods"] == ["gradcam", "shapcam"]
            assert dep.parameters["store"] == str(tmp_path / "runs")
            run = run_deployment("scheduled-explain/ci", timeout=400, poll_interval=2)
            assert run.state.is_completed(), (run.state, serve.poll())
            parent, children, artifacts, tasks = asyncio.run(_read_back(run.id))
        assert parent.state.is_completed()
        assert [c.name for c in children] == [f"explain sample ({c.parameters['run_id']})"
                                              for c in children]
        assert len(children) == 1 and children[0].state.is_completed()
        tasks = [t for t in tasks if t.name != "explain-dataset-0"]  # the subflow's own task run
        names = sorted(t.name for t in tasks)
        # one task per shard: maps and metrics from the same decoded images
        assert names == ["mobilenet_v2 shard 1/2", "mobilenet_v2 shard 2/2"]
        assert all(t.state.is_completed() for t in tasks)
        kinds = {a.type for a in artifacts}
        assert {"progress", "table", "markdown"} <= kinds
        table = next(a for a in artifacts if a.type == "table")
        assert "Grad-CAM" in str(table.data) and "Shap-CAM" in str(table.data)
        progress = next(a for a in artifacts if a.type == "progress")
        assert progress.data == 100.0
        run_dir = tmp_path / "runs" / children[0].parameters["run_id"]
        assert len(open_run(run_dir).metrics()) == 12
        # The Prefect UI (served by the same server) shows the completed flow run.
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.get(f"{prefect_server}/runs/flow-run/{children[0].id}")
        WebDriverWait(browser, 90).until(
            lambda d: children[0].name in d.find_element(By.TAG_NAME, "body").text
            and "Completed" in d.find_element(By.TAG_NAME, "body").text)
        # Its logs tab shows the task logs written on the Dask worker processes.
        WebDriverWait(browser, 60).until(
            lambda d: "images read" in d.find_element(By.TAG_NAME, "body").text
            and "explain sample/mobilenet_v2 shard" in d.find_element(By.TAG_NAME, "body").text)
        time.sleep(2)  # let the charts finish drawing
        browser.save_screenshot(str(screenshot_dir / "prefect-ui-flow-run.png"))
        assert (screenshot_dir / "prefect-ui-flow-run.png").stat().st_size > 10_000
        # A scheduler's SIGTERM stops `shapcam serve` within 15 s, with nothing left behind.
        import psutil

        descendants = psutil.Process(serve.pid).children(recursive=True)
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=15)
        _, alive = psutil.wait_procs(descendants, timeout=3)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


@pytest.mark.slow
@pytest.mark.real_weights
def test_serve_stops_on_ctrl_c_with_a_flow_run_in_progress(prefect_server, tmp_path):
    """Ctrl-C (SIGINT to the process group) while a served run computes: serve, the flow-run
    subprocess and its Dask workers are gone, and the run is Cancelled (before: all three
    still ran 21 s later)."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = f"{prefect_server}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO)}
    serve = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "serve", "--name", "slow",
         "--root", str(tmp_path / "data"), "--store", str(tmp_path / "runs"), "--methods",
         "rise", "--set", "rise.n_masks=8000", "--no-causal", "--shard-size", "1",
         "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            asyncio.run(_wait_for_deployment("scheduled-explain/slow", 120))
            run = run_deployment("scheduled-explain/slow", timeout=0)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not list(tmp_path.glob("runs/*/maps.zarr")):
                time.sleep(1)  # until the run is planned: its shard tasks go to the workers
            assert list(tmp_path.glob("runs/*/maps.zarr")), serve.poll()
            time.sleep(5)
            descendants = psutil.Process(serve.pid).children(recursive=True)
            os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in its terminal
            out, _ = serve.communicate(timeout=60)
            _, alive = psutil.wait_procs(descendants, timeout=5)
            assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
            assert "stopped by SIGINT" in out and "Traceback" not in out, out[-3000:]

            async def state():
                async with get_client() as client:
                    return (await client.read_flow_run(run.id)).state
            assert asyncio.run(state()).is_cancelled()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
