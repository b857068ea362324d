"""Commands over a stored run: ``verify``, ``evaluate-store``, ``report`` and ``query``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tasks.config import RunConfig

from ..runtime import DEFAULT_WORKERS, run_flow, task_runner
from . import app
from .common import Causal, DaskAddress, Protocol, Workers, user_errors
from .runs import preflight, store_path


@app.command()
def verify(run_dir: Annotated[str, typer.Argument(
        help="Run folder (or URL) written by `shapcam run`.")]) -> None:
    """Read a run end to end: checksums of every Zarr chunk and Parquet file, completion
    records; list what is damaged with the shard that recomputes it (exit status 1)."""
    from storage.verify import verify_run

    with user_errors():
        report = verify_run(run_dir)
    typer.echo(f"{run_dir}: {report.chunks} chunks, {report.parquet_files} Parquet files read")
    if report.ok:
        typer.echo("no damage found")
        return
    for p in report.problems:
        where = f"{p.dataset}/{p.model} shard {p.shard}" if p.shard is not None else "run"
        typer.echo(f"DAMAGED [{where}] {p.path}: {p.what}")
    typer.echo(f"{len(report.problems)} problem(s); recompute them with the run's command "
               "and --run-id ID --repair")
    raise typer.Exit(1)


RunDir = Annotated[str, typer.Argument(help="Run folder (or URL) written by `shapcam run`.")]


@app.command("evaluate-store")
def evaluate_store(
    run_dir: RunDir, protocol: Protocol = "gradcampp", causal: Causal = True,
    workers: Workers = DEFAULT_WORKERS, dask_address: DaskAddress = None,
    allow_models: Annotated[str | None, typer.Option(
        help="Comma-separated import paths of your own models that the run names: they are "
             "imported (their code runs), so a run folder cannot name one by itself.")] = None,
) -> None:
    """Recompute a run's metrics with another protocol variant, reusing its stored maps."""
    from dashboards.render import markdown
    from storage import SaliencyStore
    from tasks.reports import paper_table

    from ..explain_dataset import evaluate_store as evaluate_store_flow

    with user_errors():
        RunConfig(protocol=protocol)  # validates the name
        attrs = SaliencyStore(run_dir).attrs
        run_id = attrs["run_id"]
        stored = RunConfig.from_dict(attrs["config"])
        _check_allowed(stored, allow_models, run_dir)
        preflight(stored, dask_address)
    runner = task_runner(dask_address, workers, 1, device=stored.device,
                         resources=stored.task_resources, tasks_per_gpu=stored.tasks_per_gpu)
    with user_errors(resume=lambda: "run the same command again to finish"):
        result = run_flow(evaluate_store_flow, runner,
                          typer.echo, run_dir=store_path(run_dir), run_id=run_id,
                          protocol=protocol, causal=causal)
    for model, table in result["tables"].items():
        typer.echo("\n" + markdown(paper_table(table, f"{run_id} / {model}, protocol "
                                                      f"`{protocol}`")))


@app.command()
def report(
    run_dir: RunDir,
    protocol: Annotated[str, typer.Option(help="Which metrics variant to tabulate.")
                        ] = "scorecam",
) -> None:
    """(Re)write a run's report.html from its store and tables; print its tables."""
    from dashboards.render import markdown
    from storage import SaliencyStore
    from tasks.pipeline import aggregate
    from tasks.reports import paper_table, write_report

    with user_errors():
        config = RunConfig.from_dict(SaliencyStore(run_dir).attrs["config"]).replace(
            protocol=protocol)
        tables = aggregate(str(run_dir), config)
        path = write_report(str(run_dir), config, tables)
    for model, table in tables.items():
        typer.echo("\n" + markdown(paper_table(table, f"{model}, protocol `{protocol}`")))
    typer.echo(f"\nreport: {path}")


@app.command()
def query(
    run: Annotated[str, typer.Argument(
        help="Run folder or fsspec URL (holds maps.zarr, metrics/); a folder of runs lists "
             "them.")],
    sql: Annotated[str | None, typer.Argument(
        help="SQL over the tables metrics, manifest, summary, training (DuckDB dialect, "
             "read-only). Without it: the run's tables and their row counts.")] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the result as CSV.")] = None,
    max_rows: Annotated[int, typer.Option(min=1, help="Rows to print.")] = 50,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds before the query is "
                                                         "stopped (Ctrl-C stops it too).")
                       ] = 300.0,
) -> None:
    """Query a run: e.g. "select method, avg(avg_drop) from metrics group by method"."""
    from storage import NotARunError, open_run

    with user_errors():
        try:
            handle = open_run(run)
        except NotARunError as exc:
            _list_runs(run, exc.runs, as_error=sql is not None)
            return
        # only what is printed is converted, unless the whole result goes to --csv (whose
        # size the sandbox's byte budget bounds)
        df = handle.sql(sql or "select table_name as \"table\", estimated_size as \"rows\", "
                        "column_count as columns from duckdb_tables() order by table_name",
                        max_rows=None if csv is not None else max_rows, timeout=timeout)
    typer.echo(df.to_string(max_rows=max_rows, index=False))
    if df.attrs.get("truncated"):
        typer.secho(f"(more rows exist: {len(df):,} shown; write them with --csv, aggregate, or "
                    "select narrower columns)" if csv is None else
                    f"(the result was cut at {len(df):,} rows by the byte budget)",
                    fg=typer.colors.YELLOW, err=True)
    if csv is not None:
        df.to_csv(csv, index=False)


def _list_runs(store: str, names: list[str], as_error: bool) -> None:
    """The runs of a ``--store`` folder with their status, as the dashboard lists them."""
    from dashboards.data import list_runs, runs_frame

    runs = list_runs(store) if "://" not in store else []
    if runs:
        frame = runs_frame(runs)[["run_id", "dataset", "models", "images", "status"]]
        frame.insert(0, "folder", [Path(r.path).name for r in runs])
        text = frame.to_string(index=False)
    else:
        text = "\n".join(names)
    if as_error:
        typer.secho(f"{store} is a folder of runs; query one of them, e.g. shapcam query "
                    f"{Path(store) / names[0]} \"select ...\". Runs:", err=True,
                    fg=typer.colors.RED)
        typer.echo(text, err=True)
        raise typer.Exit(2)
    typer.echo(f"runs in {store} (query one: shapcam query {Path(store) / names[0]} "
               "\"select ...\"):")
    typer.echo(text)


def _check_allowed(config: RunConfig, allowed: str | None, run_dir: str) -> None:
    """A run folder is untrusted: the factories its config names are imported only when the
    user names them too."""
    from shapcam.errors import ShapCAMError
    from shapcam.zoo.factory import is_import_path

    names = {n.strip() for n in (allowed or "").split(",") if n.strip()}
    for model in config.models:
        if is_import_path(model.name) and model.name not in names:
            raise ShapCAMError(
                f"run {run_dir} names your model {model.name}: importing it runs its code; "
                f"pass --allow-models {model.name} if you trust it")
