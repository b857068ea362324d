"""Deployments the Prefect way: the repository's prefect.yaml deployed to a real local server,
its run picked up and executed by a `prefect worker` of a process work pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage import SaliencyStore, open_run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_weights


def _prefect(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    """``prefect ARGS`` in its own process group, stopped with everything it started if it
    does not finish in time (a stuck flow run must not outlive the test)."""
    from flows.runtime import stop_process

    proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc, timeout=10)
        out, err = proc.communicate()
        pytest.fail(f"prefect {' '.join(args)} did not finish in {timeout} s:\n"
                    f"{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{out[-3000:]}\n{err[-3000:]}"
    return out


@pytest.mark.slow
def test_prefect_yaml_deployment_runs_on_a_process_worker(mobilenet, prefect_server, tmp_path,
                                                          clean_checkout):
    env = {**os.environ, "PREFECT_API_URL": f"{prefect_server}/api",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    _prefect("work-pool", "create", "shapcam", "--type", "process", env=env)
    params = {"config": {"dataset": "sample", "root": str(tmp_path / "data"),
                         "methods": ["gradcam", "shapcam"],
                         "method_options": {"shapcam": {"permutations": 16}},
                         "causal": False, "shard_size": 3},
              "store": str(tmp_path / "runs"), "run_id": "deployed", "workers": 1}
    _prefect("--no-prompt", "deploy", "--name", "explain-sample", "--params",
             json.dumps(params), env=env)
    _prefect("deployment", "run", "scheduled-explain/explain-sample", env=env)
    # one poll: the worker takes the scheduled run, executes it in a subprocess, waits for it
    _prefect("worker", "start", "--pool", "shapcam", "--run-once", env=env, timeout=600)

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{prefect_server}/api"}), \
            get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("scheduled-explain/explain-sample")
        assert deployment.work_pool_name == "shapcam"
        assert deployment.entrypoint == "flows/scheduled.py:scheduled_explain"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
        runs = client.read_flow_runs()
        by_name = {r.flow_id: r for r in runs}
        scheduled = [r for r in runs if r.deployment_id == deployment.id]
        assert len(scheduled) == 1 and scheduled[0].state.is_completed(), scheduled
        assert len(by_name) == 2  # scheduled-explain and its explain-dataset subflow
    run_dir = tmp_path / "runs" / "deployed"
    assert SaliencyStore(run_dir).shard_status("sample", "mobilenet_v2") == {0: True, 1: True}
    assert len(open_run(run_dir).metrics()) == 12
