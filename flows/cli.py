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
from pathlib import Path
from typing import Annotated, Any

import typer

from shapcam.cli import _fail, app
from shapcam.models import ShapCAMError
from storage import StorageError
from storage.cli import query

from .runtime import ALL_METHODS, DEFAULT_WORKERS, new_run_id, run_config, run_dir_for, task_runner

app.command()(query)

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


# The options `run` and `serve` share (a deployment stores the same parameters).
Dataset = Annotated[str, typer.Option(help="sample, imagenet or voc.")]
Root = Annotated[Path | None, typer.Option(
    help="Dataset folder (sample: where to assemble it; default ~/.cache/shapcam).")]
Split = Annotated[str, typer.Option(help="VOC split file (test, val, trainval).")]
Models = Annotated[str, typer.Option(
    help="Comma-separated models; NAME or NAME:WEIGHTS (e.g. vgg16:/w/vgg16.pth).")]
Methods = Annotated[str, typer.Option(help="Comma-separated methods.")]
NImages = Annotated[int | None, typer.Option(
    help="Deterministic random sample of N images (the paper: 2000; default: all).")]
ShardSize = Annotated[int, typer.Option(help="Images per shard (= per Zarr chunk).")]
Seed = Annotated[int, typer.Option(help="Sampling and Shap-CAM seed.")]
Protocol = Annotated[str, typer.Option(help="scorecam (paper) or gradcampp.")]
Causal = Annotated[bool, typer.Option(help="Deletion/insertion AUC too.")]
Preset = Annotated[str, typer.Option(
    help="paper (the paper's settings) or quick (about 7x cheaper; the README's first run). "
         "--set overrides single options.")]
Settings = Annotated[list[str] | None, typer.Option(
    "--set", help="METHOD.KEY=VALUE, repeatable (e.g. rise.n_masks=2000).")]
Store = Annotated[str, typer.Option(
    help="Folder or fsspec URL (s3://bucket/runs) holding the runs.")]
Device = Annotated[str, typer.Option(help="cpu or cuda (tasks then need a GPU resource).")]
Workers = Annotated[int, typer.Option(help="Local Dask worker processes.")]
Threads = Annotated[int, typer.Option(help="Torch threads per worker.")]
DaskAddress = Annotated[str | None, typer.Option(
    help="Use an existing Dask scheduler, e.g. tcp://host:8786.")]


@app.command()
def run(
    dataset: Dataset = "sample", root: Root = None, split: Split = "test",
    models: Models = "mobilenet_v2:IMAGENET1K_V1", methods: Methods = ALL_METHODS,
    n_images: NImages = None, shard_size: ShardSize = 8, seed: Seed = 0,
    protocol: Protocol = "scorecam", causal: Causal = True, preset: Preset = "paper",
    settings: Settings = None, store: Store = "runs",
    run_id: Annotated[str | None, typer.Option(
        help="Run id; re-running with the same id resumes (default: a timestamp).")] = None,
    device: Device = "cpu", workers: Workers = DEFAULT_WORKERS, threads: Threads = 1,
    dask_address: DaskAddress = None,
) -> None:
    """Run the explain-dataset flow (Prefect + Dask): maps to Zarr, metrics to Parquet, report."""
    try:
        config = run_config(dataset=dataset, root=str(root) if root else None, split=split,
                            models=models, methods=methods, n_images=n_images,
                            shard_size=shard_size, seed=seed, protocol=protocol, causal=causal,
                            preset=preset, settings=settings, device=device, threads=threads)
        if dataset == "sample":
            from shapcam.weights import install_offline_weights

            install_offline_weights()
    except (ShapCAMError, RuntimeError) as exc:
        _fail(exc)
    run_id = run_id or new_run_id()
    run_dir = run_dir_for(store, run_id)
    from .explain_dataset import explain_dataset

    typer.echo(f"run {run_id}, store {run_dir}")
    try:
        result = _run_flow(explain_dataset, task_runner(dask_address, workers, threads),
                           run_dir=run_dir, run_id=run_id, config=config)
    except (ShapCAMError, StorageError) as exc:
        _fail(exc)
    from shapcam.evaluate import format_table

    for model, table in result["tables"].items():
        typer.echo("\n" + format_table(table, f"{dataset} / {model} ({result['images']} images), "
                                              f"protocol `{protocol}`, preset `{preset}`"))
    n, secs = result["images"], result["task_seconds"]
    typer.echo(f"\ntasks: {secs:.1f} s for {n} images x {len(config['models'])} model(s) "
               f"({n * len(config['models']) / secs:.2f} images/s; {result['skipped']} of "
               f"{result['shards']} shards were already done)")
    typer.echo(f"report: {result['report']}\nquery:  shapcam query {run_dir} "
               "\"select method, avg(avg_drop) from metrics group by method\"")


@app.command()
def serve(
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    cron: Annotated[str, typer.Option(help="Cron schedule (minute hour day month weekday).")
                    ] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    dataset: Dataset = "sample", root: Root = None, split: Split = "test",
    models: Models = "mobilenet_v2:IMAGENET1K_V1", methods: Methods = ALL_METHODS,
    n_images: NImages = None, shard_size: ShardSize = 8, seed: Seed = 0,
    protocol: Protocol = "scorecam", causal: Causal = True, preset: Preset = "paper",
    settings: Settings = None, store: Store = "runs",
    device: Device = "cpu", workers: Workers = DEFAULT_WORKERS, threads: Threads = 1,
    dask_address: DaskAddress = None,
) -> None:
    """Register a scheduled deployment of `shapcam run` and serve it until Ctrl-C.

    Creates the deployment `scheduled-explain/NAME` with the cron schedule and these options as
    its parameters, then waits for its runs (scheduled, or triggered with `prefect deployment
    run scheduled-explain/NAME`) and executes each in a subprocess. Each run gets a new run id
    (its scheduled time) under --store. Uses PREFECT_API_URL when set (a long-lived
    `prefect server start` is the usual setup), otherwise starts a local server for as long as
    this command runs.
    """
    params = {"dataset": dataset, "root": str(root.resolve()) if root else None,
              "split": split, "models": models, "methods": methods, "n_images": n_images,
              "shard_size": shard_size, "seed": seed, "protocol": protocol, "causal": causal,
              "preset": preset, "settings": settings or [],
              "store": store if "://" in store else str(Path(store).resolve()),
              "device": device, "workers": workers, "threads": threads,
              "dask_address": dask_address}
    try:
        run_config(**{k: v for k, v in params.items()
                      if k not in ("store", "workers", "dask_address")})  # fail now, not at 2 am
    except ShapCAMError as exc:
        _fail(exc)
    from prefect import serve as prefect_serve
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from .scheduled import scheduled_explain

    deployment = scheduled_explain.to_deployment(
        name=name, schedule=Cron(cron, timezone=timezone), parameters=params,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"shapcam run on {dataset} ({methods}), cron {cron!r} {timezone}")
    with prefect_api() as base:
        os.environ["PREFECT_API_URL"] = f"{base}/api"  # the flow-run subprocesses inherit it
        typer.echo(f"deployment scheduled-explain/{name}, cron {cron!r} ({timezone}); trigger "
                   f"now with: PREFECT_API_URL={base}/api prefect deployment run "
                   f"scheduled-explain/{name}")
        prefect_serve(deployment, print_starting_message=False)


@contextlib.contextmanager
def prefect_api():
    """PREFECT_API_URL, or a local server started for the occasion: yield the UI's base URL
    (printed) with Prefect's client settings pointing at it."""
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = (contextlib.nullcontext(os.environ["PREFECT_API_URL"])
              if os.environ.get("PREFECT_API_URL") else local_prefect_server())
    with server as url:
        base = url.removesuffix("/api")
        typer.echo(f"Prefect UI: {base}")
        with temporary_settings({PREFECT_API_URL: f"{base}/api"}):
            yield base


def _run_flow(flow, runner, **params: Any) -> dict[str, Any]:
    """Run a flow against PREFECT_API_URL, or a local server started for the occasion."""
    with prefect_api():
        return flow.with_options(task_runner=runner)(**params)


@app.command("evaluate-store")
def evaluate_store_command(
    run_dir: Annotated[str, typer.Argument(help="Run folder (or URL) written by `shapcam run`.")],
    protocol: Annotated[str, typer.Option(help="scorecam or gradcampp.")] = "gradcampp",
    causal: Annotated[bool, typer.Option(help="Deletion/insertion AUC too.")] = True,
    workers: Annotated[int, typer.Option(help="Local Dask worker processes.")
                       ] = DEFAULT_WORKERS,
    dask_address: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Recompute a run's metrics with another protocol variant, reusing its stored maps."""
    from shapcam.metrics import VARIANTS
    from storage import SaliencyStore

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
    from storage import SaliencyStore
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


def _training_dir(store: str, run_id: str | None) -> tuple[str, str]:
    if "://" in store:
        _fail(ShapCAMError("training runs write torch checkpoints: --store must be a local "
                           "folder"))
    run_id = run_id or new_run_id()
    return str((Path(store) / run_id).resolve()), run_id


@app.command()
def distill(
    dataset: Annotated[str, typer.Option(
        help="cifar10 (needs --root) or digits (sklearn's 8x8 digits at 32x32, offline).")
    ] = "cifar10",
    root: Annotated[Path | None, typer.Option(
        help="Folder holding cifar-10-batches-py (as torchvision's CIFAR10 reads it).")] = None,
    variants: Annotated[str, typer.Option(
        help="Table 4 cells: all, or some of ce, ce+kd, gradcam, gradcam+kd, gradcampp, "
             "gradcampp+kd, scorecam, scorecam+kd, shapcam, shapcam+kd.")] = "all",
    epochs: Annotated[int, typer.Option(
        help="Student epochs; the lr milestones 60/120/160 of 200 scale with it.")] = 200,
    teacher_epochs: Annotated[int | None, typer.Option(
        help="Teacher epochs (default: --epochs).")] = None,
    teacher_checkpoint: Annotated[Path | None, typer.Option(
        help="Use this trained WRN-40-2 state dict instead of training the teacher.")] = None,
    lr: Annotated[float, typer.Option(help="SGD learning rate (WRN recipe: 0.1).")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Batch size (WRN recipe: 128).")] = 128,
    alpha: Annotated[float, typer.Option(
        help="Weight of L_interpret (not given in the paper; our default 1).")] = 1.0,
    temperature: Annotated[float, typer.Option(help="KD temperature (paper: 4).")] = 4.0,
    orders: Annotated[int, typer.Option(
        help="Shap-CAM orders per step for the student's map.")] = 16,
    scorecam_channels: Annotated[int, typer.Option(
        help="Channels scored per image and step for the student's Score-CAM weights.")] = 8,
    teacher_scorecam_channels: Annotated[int | None, typer.Option(
        help="Cap on the teacher's Score-CAM channels (default: all 128).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Use the first N training images (and N/5 test images).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    store: Annotated[str, typer.Option(help="Folder holding the runs.")] = "runs",
    run_id: Annotated[str | None, typer.Option(
        help="Run id; re-running with the same id resumes every configuration.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    workers: Annotated[int, typer.Option(help="Local Dask worker processes.")
                       ] = DEFAULT_WORKERS,
    threads: Annotated[int, typer.Option(help="Torch threads per worker.")] = 1,
    dask_address: Annotated[str | None, typer.Option(
        help="Use an existing Dask scheduler, e.g. tcp://host:8786.")] = None,
) -> None:
    """Paper Table 4: train a WRN-40-2 teacher and WRN-16-2 students with explanation losses."""
    from shapcam.distill.experiment import parse_variants

    try:
        parse_variants(variants)
        if dataset == "cifar10":
            from shapcam.distill.data import cifar_folder

            if root is None:
                raise ShapCAMError("--root is required for cifar10 (the folder holding "
                                   "cifar-10-batches-py); or use --dataset digits offline")
            cifar_folder(root)
        elif dataset != "digits":
            raise ShapCAMError(f"unknown dataset {dataset!r}; use cifar10 or digits")
        if teacher_checkpoint is not None and not teacher_checkpoint.is_file():
            raise ShapCAMError(f"teacher checkpoint {teacher_checkpoint} does not exist")
    except (ShapCAMError, ValueError) as exc:
        _fail(exc)
    run_dir, run_id = _training_dir(store, run_id)
    spec = {"dataset": dataset, "root": str(root.resolve()) if root else None, "limit": limit,
            "seed": seed, "teacher": "wrn-40-2", "student": "wrn-16-2",
            "teacher_checkpoint": str(teacher_checkpoint.resolve()) if teacher_checkpoint
            else None, "epochs": epochs, "teacher_epochs": teacher_epochs or epochs,
            "schedule": {"lr": lr, "batch_size": batch_size, "seed": seed},
            "loss": {"alpha": alpha, "temperature": temperature, "orders": orders,
                     "scorecam_channels": scorecam_channels},
            "teacher_map_options": {"scorecam": {"max_channels": teacher_scorecam_channels}},
            "variants": variants, "device": device, "threads": threads,
            # the teacher trains alone: on a local cluster it gets every worker's threads
            "teacher_threads": threads if dask_address else threads * workers}
    from .training import distill as distill_flow

    typer.echo(f"run {run_id}, folder {run_dir}")
    result = _run_flow(distill_flow, task_runner(dask_address, workers, threads),
                       run_dir=run_dir, run_id=run_id, spec=spec)
    typer.echo("\n" + result["markdown"] + f"\n\nreport: {result['report']}")


@app.command("finetune-voc")
def finetune_voc(
    root: Annotated[Path, typer.Option(help="VOCdevkit (or VOC2007) folder.")],
    model: Annotated[str, typer.Option(help="torchvision classifier to fine-tune.")] = "vgg16",
    weights: Annotated[str, typer.Option(help="Its ImageNet weights (enum name).")
                       ] = "DEFAULT",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 20,
    lr: Annotated[float, typer.Option(help="SGD learning rate.")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    train_split: Annotated[str, typer.Option(help="VOC split to train on.")] = "trainval",
    test_split: Annotated[str, typer.Option(help="VOC split for mAP.")] = "test",
    limit: Annotated[int | None, typer.Option(help="First N images of each split.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    store: Annotated[str, typer.Option(help="Folder holding the runs.")] = "runs",
    run_id: Annotated[str | None, typer.Option(help="Run id; the same id resumes.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(help="Torch threads.")] = 1,
    dask_address: Annotated[str | None, typer.Option(help="An existing Dask scheduler.")
                            ] = None,
) -> None:
    """Fine-tune an ImageNet model on VOC2007 (20 classes, multi-label BCE); report mAP."""
    run_dir, run_id = _training_dir(store, run_id)
    spec = {"root": str(root.resolve()), "model": model, "weights": weights, "epochs": epochs,
            "schedule": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                         "milestones": [max(1, int(epochs * 0.6)), max(1, int(epochs * 0.8))],
                         "gamma": 0.1, "weight_decay": 5e-4, "momentum": 0.9},
            "train_split": train_split, "test_split": test_split, "limit": limit,
            "seed": seed, "device": device, "threads": threads}
    from .training import finetune_voc as finetune_flow

    typer.echo(f"run {run_id}, folder {run_dir}")
    try:
        result = _run_flow(finetune_flow, task_runner(dask_address, 1, threads),
                           run_dir=run_dir, run_id=run_id, spec=spec)
    except (ShapCAMError, ValueError) as exc:
        _fail(exc)
    typer.echo("\n" + result["markdown"] + f"\nexplain with: shapcam run --dataset voc --root "
               f"{root} --models {model}:{result['weights']}")


@app.command()
def dashboard(
    runs: Annotated[Path, typer.Option(help="Folder holding the runs (the --store of `run`).")
                    ] = Path("runs"),
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Open the runs dashboard (Streamlit): tables, overlays side by side, filters, SQL."""
    import dashboards

    if not runs.is_dir():
        _fail(ShapCAMError(f"runs folder {runs} does not exist; make a run with `shapcam run "
                           f"--store {runs}` first, or pass --runs"))
    app_path = Path(dashboards.__file__).with_name("app.py")
    typer.echo(f"dashboard: http://{host}:{port}  (runs in {runs.resolve()}; Ctrl-C stops)")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--client.toolbarMode", "viewer",
           "--", "--runs", str(runs.resolve())]
    with contextlib.suppress(KeyboardInterrupt):
        raise typer.Exit(subprocess.call(cmd))


__all__ = ["app"]
