"""The ``shapcam`` command: the science commands plus those of the layers above them.

``shapcam.cli`` knows only the science layer; this module (top of the import graph) adds the
storage command (``query``) and the orchestration command (``run``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from shapcam.cli import _fail, app, method_settings
from shapcam.models import ShapCAMError
from storage.cli import query

app.command()(query)

ALL_METHODS = "mask,rise,gradcam,gradcampp,scorecam,shapcam"


def prefect_environment(home: Path) -> None:
    """Project-local Prefect home, analytics off (the closed network would see refused calls)."""
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


# Before anything imports prefect: its settings are read at import time.
prefect_environment(Path(".prefect").resolve())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_prefect_server(timeout: float = 180.0):
    """Start ``prefect server start`` on 127.0.0.1 (API and UI), yield its URL, stop it.

    Process workers cannot share Prefect's ephemeral mode (each would start its own server on
    one SQLite file), so a run with Dask worker processes talks to one real local server.
    """
    port = _free_port()
    env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port)}
    log = open(Path(os.environ["PREFECT_HOME"]) / "server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ShapCAMError(f"the local Prefect server exited ({proc.returncode}); see "
                                   f"{log.name}")
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ShapCAMError(f"the local Prefect server did not answer within {timeout}s; "
                                   f"see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def task_runner(dask_address: str | None, workers: int, threads: int):
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": ":0",
        "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}})


@app.command()
def run(
    dataset: Annotated[str, typer.Option(help="sample, imagenet or voc.")] = "sample",
    root: Annotated[Path | None, typer.Option(help="Dataset folder.")] = None,
    split: Annotated[str, typer.Option(help="VOC split.")] = "test",
    models: Annotated[str, typer.Option(
        help="Comma-separated models; NAME or NAME:WEIGHTS (e.g. vgg16:/w/vgg16.pth).")
    ] = "mobilenet_v2:IMAGENET1K_V1",
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = ALL_METHODS,
    n_images: Annotated[int | None, typer.Option(help="Deterministic sample size.")] = None,
    shard_size: Annotated[int, typer.Option(help="Images per shard (= per Zarr chunk).")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    protocol: Annotated[str, typer.Option(help="scorecam or gradcampp.")] = "scorecam",
    causal: Annotated[bool, typer.Option(help="Deletion/insertion AUC too.")] = True,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="METHOD.KEY=VALUE, repeatable.")] = None,
    store: Annotated[str, typer.Option(
        help="Folder or fsspec URL (s3://bucket/runs) holding the runs.")] = "runs",
    run_id: Annotated[str | None, typer.Option(
        help="Run id; re-running with the same id resumes (default: a timestamp).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    workers: Annotated[int, typer.Option(help="Local Dask worker processes.")] = max(
        1, min(4, os.cpu_count() or 1)),
    threads: Annotated[int, typer.Option(help="Torch threads per worker.")] = 1,
    dask_address: Annotated[str | None, typer.Option(
        help="Use an existing Dask scheduler, e.g. tcp://host:8786.")] = None,
) -> None:
    """Run the explain-dataset flow (Prefect + Dask): maps to Zarr, metrics to Parquet, report."""
    try:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        per_method = method_settings(settings or [], names)
        model_specs = []
        for item in models.split(","):
            name, _, weights = item.strip().partition(":")
            model_specs.append({"name": name, "weights": weights or "DEFAULT", "layer": None})
    except ShapCAMError as exc:
        _fail(exc)
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = (f"{store.rstrip('/')}/{run_id}" if "://" in store
               else str((Path(store) / run_id).resolve()))
    config = {"dataset": dataset, "root": str(root) if root else None, "split": split,
              "n_images": n_images, "seed": seed, "shard_size": shard_size,
              "models": model_specs, "methods": names, "method_options": per_method,
              "protocol": protocol, "causal": causal, "device": device,
              "torch_threads": threads}
    if dataset == "sample":
        from shapcam.weights import install_offline_weights

        install_offline_weights()
    from .explain_dataset import explain_dataset

    typer.echo(f"run {run_id}, store {run_dir}")
    try:
        result = _run_flow(explain_dataset, task_runner(dask_address, workers, threads),
                           run_dir=run_dir, run_id=run_id, config=config)
    except ShapCAMError as exc:
        _fail(exc)
    from shapcam.evaluate import format_table

    for model, table in result["tables"].items():
        typer.echo("\n" + format_table(table, f"{dataset} / {model} ({result['images']} images), "
                                              f"protocol `{protocol}`"))
    typer.echo(f"\nreport: {result['report']}\nquery:  shapcam query {run_dir} "
               "\"select method, avg(avg_drop) from metrics group by method\"")


def _run_flow(flow, runner, **params: Any) -> dict[str, Any]:
    """Run a flow against PREFECT_API_URL, or a local server started for the occasion."""
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = (contextlib.nullcontext(os.environ["PREFECT_API_URL"])
              if os.environ.get("PREFECT_API_URL") else local_prefect_server())
    with server as url:
        base = url.removesuffix("/api")
        typer.echo(f"Prefect UI: {base}")
        with temporary_settings({PREFECT_API_URL: f"{base}/api"}):
            return flow.with_options(task_runner=runner)(**params)


@app.command("evaluate-store")
def evaluate_store_command(
    run_dir: Annotated[str, typer.Argument(help="Run folder (or URL) written by `shapcam run`.")],
    protocol: Annotated[str, typer.Option(help="scorecam or gradcampp.")] = "gradcampp",
    causal: Annotated[bool, typer.Option(help="Deletion/insertion AUC too.")] = True,
    workers: Annotated[int, typer.Option()] = max(1, min(4, os.cpu_count() or 1)),
    dask_address: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Recompute a run's metrics with another protocol variant, reusing its stored maps."""
    from shapcam.metrics import VARIANTS
    from storage import SaliencyStore, StorageError

    from .explain_dataset import evaluate_store

    try:
        if protocol not in VARIANTS:
            raise ShapCAMError(f"unknown protocol {protocol!r}; use one of {', '.join(VARIANTS)}")
        run_id = SaliencyStore(run_dir).attrs["run_id"]
    except (ShapCAMError, StorageError) as exc:
        _fail(exc)
    result = _run_flow(evaluate_store, task_runner(dask_address, workers, 1),
                       run_dir=run_dir if "://" in run_dir else str(Path(run_dir).resolve()),
                       run_id=run_id, protocol=protocol,
                       causal=causal)
    from shapcam.evaluate import format_table

    for model, table in result["tables"].items():
        typer.echo("\n" + format_table(table, f"{run_id} / {model}, protocol `{protocol}`"))


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="Run folder (or URL) written by `shapcam run`.")],
    protocol: Annotated[str, typer.Option(help="Which metrics variant to tabulate.")
                        ] = "scorecam",
) -> None:
    """(Re)write a run's report.html from its store and tables; print its tables."""
    from shapcam.evaluate import format_table
    from storage import SaliencyStore, StorageError
    from tasks.report import write_report
    from tasks.shards import aggregate

    try:
        config = {**SaliencyStore(run_dir).attrs["config"], "protocol": protocol}
        tables = aggregate(str(run_dir), config)
        path = write_report(str(run_dir), config, tables)
    except StorageError as exc:
        _fail(exc)
    for model, table in tables.items():
        typer.echo("\n" + format_table(table, f"{model}, protocol `{protocol}`"))
    typer.echo(f"\nreport: {path}")


__all__ = ["app"]
