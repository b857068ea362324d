"""``shapcam query RUN "SQL"``: run SQL over a run's tables and print the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import StorageError
from .query import open_run


def query(
    run: Annotated[str, typer.Argument(
        help="Run folder or fsspec URL (holds maps.zarr, metrics/).")],
    sql: Annotated[str, typer.Argument(
        help="SQL over the views metrics, manifest and summary (DuckDB dialect).")],
    csv: Annotated[Path | None, typer.Option(help="Also write the result as CSV.")] = None,
    max_rows: Annotated[int, typer.Option(help="Rows to print.")] = 50,
) -> None:
    """Query a run: e.g. "select method, avg(avg_drop) from metrics group by method"."""
    try:
        df = open_run(run).sql(sql)
    except StorageError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(df.to_string(max_rows=max_rows, index=False))
    if csv is not None:
        df.to_csv(csv, index=False)
