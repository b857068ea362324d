"""``shapcam dashboard``: the Streamlit runs dashboard over a folder of runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..runtime import stop_process
from ..stops import Stopped, stop_signals
from . import app
from .common import fail


@app.command()
def dashboard(
    runs: Annotated[str, typer.Option(
        help="Folder or fsspec URL (s3://bucket/runs) holding the runs (the --store of `run`).")
                    ] = "runs",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Open the runs dashboard (Streamlit): tables, overlays side by side, filters, SQL."""
    import dashboards
    from storage.location import Location

    if "://" not in runs:
        runs = str(Path(runs).resolve())
    if not Location(runs).isdir():
        fail(f"runs folder {runs} does not exist; make a run with `shapcam run --store {runs}` "
             "first, or pass --runs")
    app_path = Path(dashboards.__file__).with_name("app.py")
    if not _loopback(host):
        typer.secho(f"warning: the dashboard has no login; on {host} anyone who can reach port "
                    f"{port} sees every run in {runs} (its SQL box is read-only and sandboxed). "
                    "Put it behind an authenticating proxy, or use --host 127.0.0.1 with an "
                    "SSH tunnel.", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"dashboard: http://{host}:{port}  (runs in {runs}; Ctrl-C stops)")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--client.toolbarMode", "viewer",
           "--", "--runs", runs]
    # Streamlit in its own session: SIGTERM or Ctrl-C reach this command, which stops it with
    # its process group (a scheduler's SIGTERM would otherwise leave it serving).
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        with stop_signals():
            code = proc.wait()
    except Stopped as stop:
        stop_process(proc, timeout=10)
        typer.echo(f"dashboard stopped ({stop.name})")
        raise typer.Exit(stop.exit_code) from None
    finally:
        if proc.poll() is None:
            stop_process(proc, timeout=10)
    raise typer.Exit(code)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to be local
        return False
