"""Dataset runs: ``run`` (the explain-dataset flow) and ``serve`` (its cron deployment).

``run`` and ``serve`` take the same run options, declared once in :data:`RUN_OPTIONS` (a new
run option is a field of :class:`tasks.config.RunConfig` plus one line here).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from storage.lock import run_lock
from storage.names import check_run_id
from tasks.config import ALL_METHODS, DEFAULT_MODEL, DEFAULT_WEIGHTS, RunConfig, parse_resources

from ..runtime import DEFAULT_WORKERS, new_run_id, run_dir_for, run_flow, task_runner
from . import app
from .common import (
    BatchImages,
    Causal,
    DaskAddress,
    DecodeThreads,
    Device,
    Metrics,
    PgClass,
    Precision,
    Preset,
    Protocol,
    RunId,
    Seed,
    Settings,
    Store,
    Threads,
    Workers,
    fail,
    user_errors,
)

_D = RunConfig()
#: (name, type with its Typer option, default) of every option `run` and `serve` share.
RUN_OPTIONS: list[tuple[str, Any, Any]] = [
    ("dataset", Annotated[str, typer.Option(
        help="sample, imagenet, voc, folder (your image folder: class subfolders or flat) or "
             "manifest (a CSV/Parquet table of image paths or URLs).")], _D.dataset),
    ("root", Annotated[str | None, typer.Option(
        help="Dataset folder, manifest file, or their s3:// (any fsspec) URL (sample: where "
             "to assemble it; default ~/.cache/shapcam).")], None),
    ("boxes", Annotated[Path | None, typer.Option(
        help="COCO-format instances JSON whose boxes (and image sizes) annotate the images: "
             "the pointing game and localisation metrics.")], None),
    ("class_map", Annotated[Path | None, typer.Option(
        help="JSON {folder or label name: class index or class name} mapping your labels to "
             "the model's classes (default: by the model's class names, then as indices).")],
     None),
    ("split", Annotated[str, typer.Option(help="VOC split file (test, val, trainval).")],
     _D.split),
    ("models", Annotated[str, typer.Option(
        help="Comma-separated models; NAME or NAME:WEIGHTS (e.g. vgg16:/w/vgg16.pth, "
             "timm:convnext_tiny:pretrained), or your factory package.module:function"
             "[:WEIGHTS_FILE] (docs/models.md).")],
     f"{DEFAULT_MODEL}:{DEFAULT_WEIGHTS}"),
    ("input_size", Annotated[int | None, typer.Option(
        help="Input side in pixels of every model (default: what each declares, else 224).",
        show_default=False)], None),
    ("methods", Annotated[str, typer.Option(help="Comma-separated methods.")],
     ",".join(ALL_METHODS)),
    ("n_images", Annotated[int | None, typer.Option(
        help="Deterministic random sample of N images (the paper: 2000; default: all).")],
     None),
    ("shard_size", Annotated[int | None, typer.Option(
        help="Images per shard (= per Zarr chunk, per task, the unit of resume). Default: "
             "from the number of images, 8 up to 4,000, then doubled up to 128 so a run has "
             "at most ~500 shards per model (ILSVRC's 50,000: 128).")], _D.shard_size),
    ("seed", Seed, _D.seed),
    ("protocol", Protocol, _D.protocol),
    ("causal", Causal, _D.causal),
    ("metrics", Metrics, ""),
    ("target", Annotated[str, typer.Option(
        help="Classes explained per image: predicted (paper), label, topk:K or present (every "
             "annotated class); several classes give the store a class axis.")], _D.target),
    ("pg_class", PgClass, _D.pg_class),
    ("preset", Preset, _D.preset),
    ("settings", Settings, None),
    ("store", Store, "runs"),
    ("device", Device, _D.device),
    ("batch_images", BatchImages, None),
    ("forward_batch", Annotated[int | None, typer.Option(
        help="Images per forward of RISE, Score-CAM and the metrics (default: 4 on CPU, "
             "from free memory on GPU).", show_default=False)], None),
    ("precision", Precision, _D.precision),
    ("channels_last", Annotated[bool, typer.Option(
        help="Model and inputs in the channels-last (NHWC) layout (GPU tensor cores).")],
     _D.channels_last),
    ("decode_threads", DecodeThreads, None),
    ("workers", Workers, DEFAULT_WORKERS),
    ("threads", Threads, 1),  # one task per worker process: one thread each
    ("gpus", Annotated[str | None, typer.Option(
        help="With --device cuda and no --dask-address: the GPUs of the local cluster, one "
             "worker each (e.g. 0,1; default: every visible GPU).")], None),
    ("tasks_per_gpu", Annotated[int, typer.Option(
        help="With --device cuda: shard tasks in flight per GPU; each asks for GPU=1/N, so "
             "one computes while another decodes, writes and reports (1 on small cards: "
             "each task holds a shard's batch).")], _D.tasks_per_gpu),
    ("task_resources", Annotated[str | None, typer.Option(
        help="Dask resources each task asks for, NAME=AMOUNT[,...] or none (default: "
             "GPU=1/--tasks-per-gpu with --device cuda, none on CPU); local workers offer "
             "them.", show_default=False)], None),
    ("resource_wait", Annotated[float, typer.Option(
        help="Seconds to wait for a Dask worker offering the tasks' resources before failing."
    )], _D.resource_wait),
    ("dask_address", DaskAddress, None),
]
#: How a run executes, not what it computes (not in RunConfig).
_EXECUTION = ("store", "workers", "gpus", "dask_address")


def with_run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``func(own options..., **options)`` the :data:`RUN_OPTIONS` as Typer options."""
    sig = inspect.signature(func, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                               annotation=kind) for name, kind, default in RUN_OPTIONS]
    func.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
    func.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
    return func


def run_config(options: dict[str, Any]) -> RunConfig:
    """The validated config of the run options (the execution options left out). On a local
    GPU cluster every worker sees its one GPU as ``cuda``: ``--device cuda:N`` becomes
    ``--gpus N`` there."""
    fields = {k: v for k, v in options.items()
              if k not in (*_EXECUTION, "task_resources")}
    device = fields["device"]
    if options["dask_address"] is None and device.startswith("cuda:"):
        options["gpus"] = options["gpus"] or device.partition(":")[2]
        fields["device"] = "cuda"
    return RunConfig.build(resources=parse_resources(options["task_resources"]), **fields)


def runner_for(config: RunConfig, options: dict[str, Any]) -> Any:
    """The Dask task runner of a run: ``--dask-address``, else a local cluster (``--workers``
    on CPU, one worker per GPU of ``--gpus`` with CUDA) whose workers offer the tasks'
    resources."""
    return task_runner(options["dask_address"], options["workers"], options["threads"],
                       device=config.device, gpus=options["gpus"],
                       resources=config.task_resources, tasks_per_gpu=config.tasks_per_gpu)


def store_path(store: str) -> str:
    return store if "://" in store else str(Path(store).resolve())


@app.command()
@with_run_options
def run(run_id: RunId = None, repair: Annotated[bool, typer.Option(
        help="Verify the run first and recompute its damaged shards (see `shapcam verify`).")
        ] = False, dry_run: Annotated[bool, typer.Option(
        help="Compute nothing: print the passes per image per method and the projected hours "
             "on this machine from a short calibration (about 20 s per model).")] = False,
        **options: Any) -> None:
    """Run the explain-dataset flow (Prefect + Dask): maps to Zarr, metrics to Parquet, report."""
    from dashboards.render import markdown
    from tasks.reports import caption, paper_table

    from ..explain_dataset import explain_dataset

    with user_errors():
        if run_id is not None:
            check_run_id(run_id)  # before anything else: it names a folder
        config = run_config(options)
        preflight(config, options["dask_address"], options["gpus"])
        if dry_run:
            _dry_run(config, options)
            return
    if repair and run_id is None:
        fail("--repair needs the --run-id of the run to repair")
    run_id = run_id or new_run_id()
    with user_errors():
        run_dir = run_dir_for(options["store"], run_id)
    typer.echo(f"run {run_id}, store {run_dir}")
    with user_errors(resume=lambda: _resume_hint(run_dir, run_id, config)), run_lock(run_dir):
        if repair:  # under the run's lock, as the flow: nobody writes what is repaired
            _repair(run_dir)
        result = run_flow(explain_dataset, runner_for(config, options), typer.echo,
                          run_dir=run_dir, run_id=run_id, config=config.to_dict())
    for model, table in result["tables"].items():
        typer.echo("\n" + markdown(paper_table(table, caption(config, model,
                                                                result["images"]))))
    n, secs, models = result["images"], result["task_seconds"], len(config.models)
    done = f"{result['skipped']} of {result['shards']} shards were already done"
    if result["skipped"] >= result["shards"]:
        typer.echo(f"\ntasks: none to run ({done})")
    else:
        typer.echo(f"\ntasks: {secs:.1f} s for {n} images x {models} model(s) "
                   f"({n * models / secs:.2f} images/s; {done})")
    typer.echo(f"report: {result['report']}\nquery:  shapcam query {run_dir} "
               "\"select method, avg(avg_drop) from metrics group by method\"")


def _dry_run(config: RunConfig, options: dict[str, Any]) -> None:
    """``run --dry-run``: the cost model of this run (:mod:`shapcam.runtime.cost`) on this
    machine."""
    import torch

    from dashboards.render import Table, markdown
    from shapcam.errors import ShapCAMError
    from shapcam.evaluation.targets import annotated
    from shapcam.runtime.cost import calibrate, calibration_batch, calibration_size
    from shapcam.zoo.models import load_model
    from tasks.plan import read_dataset

    spec_t = config.target_spec
    classes = float(spec_t.k) if spec_t.kind == "topk" else 1.0  # maps per image
    try:
        records = read_dataset(config)
        n = len(records)
        where = f"{config.dataset} ({n} images)"
        if spec_t.kind == "present" and records:
            classes = sum(len(annotated(r)) for r in records) / n
    except ShapCAMError:
        if config.n_images is None:
            raise
        n, where = config.n_images, f"{config.n_images} images of {config.dataset} (not read)"
    if classes != 1:
        where += f", {classes:.2f} classes explained per image (--target {spec_t})"
    device = config.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShapCAMError("--dry-run calibrates on this machine, which has no CUDA device; "
                           "run it on a GPU node (or project a CPU run with --device cpu)")
    parallel = (len(_gpus_of(options)) if device.startswith("cuda") and
                not options["dask_address"] else options["workers"])
    torch.set_num_threads(options["threads"])
    total = 0.0
    for spec in config.models:
        lm = load_model(spec.name, spec.weights, target_layer=spec.layer, device=device,
                        input_size=spec.input_size)
        x = calibration_batch(lm.device, calibration_size(lm.device, config.batch_images),
                              lm.input_size)
        t = time.perf_counter()
        costs = calibrate(lm, config.methods, config.method_options,
                          config.causal_pixels_at(lm.input_size),
                          config.protocol, x)
        secs = time.perf_counter() - t
        per_image = sum(c.seconds for c in costs)
        total += per_image * n * classes
        rows = [[c.method, c.passes, c.map_seconds, c.metric_seconds, c.seconds]
                for c in costs] + [["all", "", None, None, per_image]]
        name = (torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda"
                else f"CPU, {options['threads']} thread(s)")
        typer.echo(markdown(Table(
            f"{spec.name} on {name}: projected seconds per image (calibrated in {secs:.0f} s "
            f"on {x.shape[0]} image(s))",
            ["method", "passes per image (maps; metrics)", "maps s", "metrics s", "total s"],
            rows, digits=3)) + "\n")
    many = total / max(1, parallel)
    typer.echo(f"projected: {where} x {len(config.models)} model(s), preset {config.preset}: "
               f"{total:.0f} s ({total / 3600:.2f} h) for one worker; {many:.0f} s "
               f"({many / 3600:.2f} h) on {parallel} "
               f"{'GPU' if device.startswith('cuda') else 'worker'}(s) (compute only: add "
               "about a minute for the Prefect server and the cluster)")


def _gpus_of(options: dict[str, Any]) -> list[str]:
    from ..runtime import visible_gpus

    return visible_gpus(options["gpus"])


def _repair(run_dir: str) -> None:
    from storage.verify import mark_for_repair, verify_run

    with user_errors():
        report = verify_run(run_dir)
        marked = mark_for_repair(run_dir, report)
    shards = ", ".join(f"{d}/{m} shard {k}" for d, m, k in marked) or "none"
    typer.echo(f"verified {report.chunks} chunks and {report.parquet_files} Parquet files: "
               f"{len(report.problems)} problem(s); recomputing {shards}")


def preflight(config: RunConfig, dask_address: str | None, gpus: str | None = None) -> None:
    """Before a server or cluster starts: every factory imports and the weights of every
    model load on this machine (cached, from the offline package, or downloaded now) and,
    with CUDA, a GPU is visible. Only the imports are checked for a remote cluster, whose
    workers have their own devices, files and caches."""
    from shapcam.zoo.factory import is_import_path
    from shapcam.zoo.models import ensure_weights
    from tasks.workers import cached_model

    from ..runtime import visible_gpus

    for model in config.models:  # the flow plans on this machine: it builds them too
        if is_import_path(model.name):  # imported, run, and run at its input size
            cached_model(model, "cpu")
    if dask_address is None:
        if config.device.startswith("cuda"):
            visible_gpus(gpus)
        for model in config.models:
            ensure_weights(model.name, model.weights)


def _resume_hint(run_dir: str, run_id: str, config: RunConfig) -> str:
    from storage import SaliencyStore, StorageError

    try:
        store = SaliencyStore(run_dir)
        status = [s for m in config.models for s in store.shard_status(config.dataset,
                                                                       m.name).values()]
        done = f"{sum(status)} of {len(status)} shards done"
    except (StorageError, KeyError, OSError):
        done = "no shard done"
    return f"{done}; resume with the same command and --run-id {run_id}"


@app.command()
@with_run_options
def serve(
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    cron: Annotated[str, typer.Option(help="Cron schedule (minute hour day month weekday).")
                    ] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    **options: Any,
) -> None:
    """Register a scheduled deployment of `shapcam run` and serve it until Ctrl-C.

    Creates the deployment `scheduled-explain/NAME` with the cron schedule and these options as
    its parameters, then waits for its runs (scheduled, or triggered with `prefect deployment
    run scheduled-explain/NAME`) and executes each in a subprocess. Each run gets a new run id
    (its scheduled time) under --store. Uses PREFECT_API_URL when set (a long-lived
    `prefect server start` is the usual setup), otherwise starts a local server for as long as
    this command runs.
    """
    with user_errors():
        config = run_config(options)  # fail now, not at 2 am
        preflight(config, options["dask_address"], options["gpus"])
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from ..runtime import prefect_api
    from ..scheduled import scheduled_explain
    from ..serving import serve_until_stopped
    from ..stops import Stopped

    params = {"config": config.to_dict(), "store": store_path(options["store"]),
              "workers": options["workers"], "gpus": options["gpus"],
              "dask_address": options["dask_address"]}
    deployment = scheduled_explain.to_deployment(
        name=name, schedule=Cron(cron, timezone=timezone), parameters=params,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"shapcam run on {config.dataset} ({', '.join(config.methods)}), cron "
                    f"{cron!r} {timezone}")
    try:
        with prefect_api(typer.echo) as base:
            typer.echo(f"deployment scheduled-explain/{name}, cron {cron!r} ({timezone}); "
                       f"trigger now with: PREFECT_API_URL={base}/api prefect deployment run "
                       f"scheduled-explain/{name}")
            serve_until_stopped(deployment)
    except Stopped as stop:
        typer.secho(f"serve stopped by {stop.name}: runs in progress are marked Cancelled and "
                    "their processes stopped", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(stop.exit_code) from None
