"""GPU workers that exist: the local cluster pins one worker per GPU and declares the resource,
external workers started with ``--resources GPU=1`` share a run, and a run whose tasks ask for a
resource no worker offers fails fast with a message instead of pending forever.

No GPU here: ``--task-resources GPU=1`` makes CPU tasks ask for the resource that CUDA tasks ask
for, so the scheduling path is the one a GPU run takes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.runtime import local_cluster, visible_gpus
from shapcam.errors import ShapCAMError
from storage import SaliencyStore, open_run
from tasks.config import RunConfig, parse_resources

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from flows.cli import app; app()"]


def test_local_gpu_cluster_pins_one_worker_per_device():
    from distributed import Client

    with local_cluster(devices=["0", "1"], resources={"GPU": 1}) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        info = client.scheduler_info(n_workers=-1)["workers"]
        assert sorted(w["name"] for w in info.values()) == ["gpu-0", "gpu-1"]
        assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1 for w in info.values())
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        names = {a: w["name"] for a, w in info.items()}
        assert {names[a]: v for a, v in seen.items()} == {"gpu-0": "0", "gpu-1": "1"}
    # two tasks per GPU: each asks for half of it, the worker has the threads and offers one
    with local_cluster(devices=["0"], resources={"GPU": 0.5}, tasks_per_device=2) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        (w,) = client.scheduler_info(n_workers=-1)["workers"].values()
        assert w["resources"] == {"GPU": 1} and w["nthreads"] == 2


def test_gpu_selection_and_resource_parsing():
    assert visible_gpus("0, 2") == ["0", "2"]
    with pytest.raises(ShapCAMError, match="device indices"):
        visible_gpus(" , ")
    import torch

    if torch.cuda.device_count() == 0:
        with pytest.raises(ShapCAMError, match="no CUDA device is visible"):
            visible_gpus()
    assert parse_resources(None) is None and parse_resources("none") == {}
    assert parse_resources("GPU=1, MEM=0.5") == {"GPU": 1, "MEM": 0.5}
    for bad in ("GPU", "GPU=0", "=1", "GPU=x"):
        with pytest.raises(ShapCAMError, match="NAME=AMOUNT"):
            parse_resources(bad)
    assert RunConfig(device="cuda").task_resources == {"GPU": 0.5}  # two tasks per GPU
    assert RunConfig(device="cuda", tasks_per_gpu=1).task_resources == {"GPU": 1}
    with pytest.raises(ShapCAMError, match="--tasks-per-gpu must be >= 1, got 0"):
        RunConfig(device="cuda", tasks_per_gpu=0)
    assert RunConfig(device="cpu").task_resources == {}
    assert RunConfig(device="cuda", resources={}).task_resources == {}


def _env(tmp_path: Path, api: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO),
           # as docs/orchestration.md tells external workers (the `storage` package)
           "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
           "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
           "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    if api is not None:  # a shared server (else the command starts its own)
        env["PREFECT_API_URL"] = api
    return env


def _wait_for_port(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            import json

            return json.loads(path.read_text())["address"]
        time.sleep(0.2)
    raise TimeoutError(f"no scheduler file {path}")


@pytest.fixture
def scheduler(tmp_path):
    """``dask scheduler`` in a subprocess; yields (address, start_worker)."""
    env = _env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                               "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                               ":0", "--scheduler-file", str(tmp_path / "scheduler.json")],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    address = _wait_for_port(tmp_path / "scheduler.json")

    def start_worker(*extra: str, nthreads: int = 1) -> None:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1",
             "--nthreads", str(nthreads), "--host", "127.0.0.1", "--no-dashboard", *extra],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))

    try:
        yield address, start_worker
    finally:
        from flows.runtime import stop_process

        for p in reversed(procs):
            stop_process(p, timeout=10)


def _wait_workers(address: str, n: int) -> list[str]:
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(n, timeout=90)
        return sorted(client.scheduler_info(n_workers=-1)["workers"])


@pytest.mark.slow
@pytest.mark.real_weights
def test_two_external_gpu_workers_share_a_run(mobilenet, scheduler, tmp_path, shared_api):
    """The documented recipe: `dask worker --resources GPU=1 --nthreads 2` per GPU, tasks
    asking for GPU=0.5 (what `--device cuda` asks by default, two shard tasks per GPU): both
    workers compute, two tasks overlap on one worker, and the maps are those of a plain
    Grad-CAM (tasks in flight together share no model or method)."""
    address, start_worker = scheduler
    start_worker("--resources", "GPU=1", nthreads=2)
    start_worker("--resources", "GPU=1", nthreads=2)
    workers = _wait_workers(address, 2)
    out = subprocess.run([*CLI, "run", "--root", str(tmp_path / "data"), "--store",
                          str(tmp_path / "runs"), "--run-id", "ext", "--methods", "gradcam",
                          "--no-causal", "--shard-size", "1", "--dask-address", address,
                          "--task-resources", "GPU=0.5"], cwd=tmp_path,
                         env=_env(tmp_path, shared_api),
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    st = SaliencyStore(tmp_path / "runs" / "ext")
    shards = [st.shard_record("sample", "mobilenet_v2", k) for k in range(6)]
    assert {s["worker"] for s in shards} == set(workers), shards  # both workers computed
    overlapping = [(a, b) for i, a in enumerate(shards) for b in shards[i + 1:]
                   if a["worker"] == b["worker"] and a["thread"] != b["thread"]
                   and a["started_at"] < b["started_at"] + b["wall_seconds"]
                   and b["started_at"] < a["started_at"] + a["wall_seconds"]]
    assert overlapping, shards  # two tasks at once on one worker
    run = open_run(tmp_path / "runs" / "ext")
    assert len(run.metrics()) == 6
    from test_pipeline import assert_float16_of

    from shapcam import GradCAM
    from shapcam.data import open_dataset
    from shapcam.data.images import load_batch

    maps = run.maps("sample", "mobilenet_v2", "gradcam")
    records = open_dataset("sample", tmp_path / "data")
    assert len(records) == 6
    for rec in records:
        x, _ = load_batch([rec.path])
        want = GradCAM(mobilenet)(x).maps[0].numpy()
        assert_float16_of(maps.sel(image=rec.image_id).values, want)


@pytest.mark.slow
@pytest.mark.real_weights
def test_a_resource_no_worker_offers_fails_fast_with_the_fix(mobilenet, scheduler, tmp_path,
                                                             shared_api):
    address, start_worker = scheduler
    start_worker()  # no resources
    _wait_workers(address, 1)
    # a task pending forever would hit this timeout instead of the message
    out = subprocess.run([*CLI, "run", "--root", str(tmp_path / "data"), "--store",
                          str(tmp_path / "runs"), "--run-id", "none", "--methods", "gradcam",
                          "--no-causal", "--dask-address", address, "--task-resources", "GPU=1",
                          "--resource-wait", "5"], cwd=tmp_path,
                         env=_env(tmp_path, shared_api),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out.stderr
    assert "no Dask worker offers the resource GPU=1" in lines[0]
    assert "offering: none" in lines[0] and "--resources GPU=1" in lines[0]
    assert "Traceback" not in out.stderr
