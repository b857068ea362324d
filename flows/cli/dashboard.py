"""``shapcam dashboard``: the Streamlit runs dashboard over a folder of runs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import fail


@app.command()
def dashboard(
    runs: Annotated[Path, typer.Option(help="Folder holding the runs (the --store of `run`).")
                    ] = Path("runs"),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Open the runs dashboard (Streamlit): tables, overlays side by side, filters, SQL."""
    import dashboards

    if not runs.is_dir():
        fail(f"runs folder {runs} does not exist; make a run with `shapcam run --store {runs}` "
             "first, or pass --runs")
    app_path = Path(dashboards.__file__).with_name("app.py")
    typer.echo(f"dashboard: http://{host}:{port}  (runs in {runs.resolve()}; Ctrl-C stops)")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--client.toolbarMode", "viewer",
           "--", "--runs", str(runs.resolve())]
    with contextlib.suppress(KeyboardInterrupt):
        raise typer.Exit(subprocess.call(cmd))
