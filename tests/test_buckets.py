"""Images and the run itself in an S3 bucket, served on 127.0.0.1 by a real S3-protocol server
(moto's server mode, what s3fs-based projects test against), explained by Dask workers started
in folders of their own that share no path with the command: plan, shards, a worker killed,
resume, verify, query, report, dashboard data."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

OWN = "own_models:three_shapes"
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
          "AWS_DEFAULT_REGION": "us-east-1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _kill_tree(proc: subprocess.Popen) -> None:
    with_children = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(True))]
    for pid in with_children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server for the test; this process and its children use it (environment)."""
    port = _port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=tmp_path)
    try:
        _wait_port(port)
        env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("team-bucket")
        yield fs, env
    finally:
        server.kill()
        server.wait(timeout=30)


def _worker(folder: Path, scheduler: str, env: dict[str, str]) -> subprocess.Popen:
    """A Dask worker process in ``folder``, its own copy of the team's model module on its
    PYTHONPATH (how a team ships its package to workers without installing it)."""
    folder.mkdir()
    (folder / "own_models.py").write_text((HERE / "own_models.py").read_text())
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", scheduler, "--nthreads", "1",
         "--nworkers", "1", "--no-dashboard", "--local-directory", str(folder / "dask")],
        cwd=folder, env={**env, "PYTHONPATH": str(folder)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_images_and_runs_in_a_bucket_with_workers_on_their_own(s3, tmp_path, shared_api):
    from distributed import Client
    from test_own_data import make_shapes

    from storage import open_run

    fs, s3_env = s3
    images = tmp_path / "upload"
    coco = make_shapes(images, per_class=2)
    fs.put(str(images), "team-bucket/shapes", recursive=True)
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    project = tmp_path / "project"  # the command's folder: its own copy of the module
    project.mkdir()
    (project / "own_models.py").write_text((HERE / "own_models.py").read_text())
    env = {**os.environ, **s3_env, "PREFECT_API_URL": shared_api,
           "PREFECT_HOME": str(tmp_path / "prefect"),
           # docs/orchestration.md: a spilling worker's storage/ folder would shadow ours
           "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
           "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False"}
    env.pop("PYTHONPATH", None)
    port = _port()
    address = f"tcp://127.0.0.1:{port}"
    (tmp_path / "scheduler").mkdir()
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", str(port), "--no-dashboard"], cwd=tmp_path / "scheduler", env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    workers = [_worker(tmp_path / f"worker-{i}", address, env) for i in range(2)]
    try:
        _wait_port(port)
        with Client(address) as client:
            client.wait_for_workers(2, timeout=120)
        store = "s3://team-bucket/runs"
        args = ["run", "--dataset", "folder", "--root", "s3://team-bucket/shapes", "--boxes",
                str(tmp_path / "instances.json"), "--models", OWN, "--methods",
                "gradcam,shapcam", "--set", "shapcam.permutations=8", "--no-causal",
                "--shard-size", "1", "--store", store, "--run-id", "bucket",
                "--dask-address", address]
        script = Path(sys.executable).parent / "shapcam"
        cmd = [str(script)] if script.exists() else [
            sys.executable, "-c", "from flows.cli import app; app()"]
        first = subprocess.Popen([*cmd, *args], cwd=project, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        # a worker is killed once the first shard is in the bucket
        end = time.time() + 300
        while not fs.glob("team-bucket/runs/bucket/shards/**/shard-*.json") and \
                time.time() < end and first.poll() is None:
            time.sleep(0.3)
        _kill_tree(workers[0])
        out, _ = first.communicate(timeout=480)
        again = subprocess.run([*cmd, *args], cwd=project, env=env, capture_output=True,
                               text=True, timeout=480)
        assert again.returncode == 0, out[-2000:] + again.stdout[-3000:] + again.stderr[-2000:]
        run = open_run(f"{store}/bucket")
        m = run.metrics()
        assert len(m) == 12 and m["error"].isna().all() and set(m["label"]) == {0, 1, 2}
        assert not m.duplicated(["image_id", "method"]).any()
        assert (m["pointing"] == "scored").sum() == 12 - (m["target"] != m["label"]).sum()
        assert run.image_index("folder")["path"].str.startswith("s3://team-bucket/").all()
        assert run.photo("folder", "circle/0", (64, 64)).shape == (64, 64, 3)
        maps = run.maps("folder", OWN, "shapcam")
        assert maps.shape == (6, 64, 64)
        got = run.sql("select method, count(*) as n from metrics group by method order by 1")
        assert got["n"].tolist() == [6, 6]
        assert fs.exists("team-bucket/runs/bucket/report.html")
        assert f"report: {store}/bucket/report.html" in again.stdout
        from dashboards.data import list_runs

        listed = list_runs(store)  # the dashboard's run list, from the bucket
        assert [(r.run_id, r.status, r.images) for r in listed] == [("bucket", "completed", 6)]
        verify = subprocess.run([*cmd, "verify", f"{store}/bucket"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=300)
        assert verify.returncode == 0 and "no damage found" in verify.stdout, verify.stdout
        # nothing of the run is on the command's disk or the workers'
        local = [p for p in project.rglob("*") if p.name != "own_models.py"
                 and "__pycache__" not in p.parts]
        assert not local, local
    finally:
        for proc in [*workers, scheduler]:
            if proc.poll() is None:
                _kill_tree(proc)
