"""The ``shapcam`` command: one Typer app, one module per family of commands.

- :mod:`.explain`: ``explain``, ``evaluate``, ``demo``, ``setup`` (one process, no Prefect);
- :mod:`.runs`: ``run``, ``serve`` (dataset runs);
- :mod:`.stored`: ``verify``, ``evaluate-store``, ``report``, ``query`` (over a stored run);
- :mod:`.training`: ``distill``, ``finetune-voc``;
- :mod:`.dashboard`: ``dashboard``.

Library errors (:class:`shapcam.errors.ShapCAMError`, :class:`storage.StorageError`) become
one-line messages with exit status 2 (:func:`.common.user_errors`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..runtime import prefect_environment

# Before anything imports prefect: its settings are read at import time.
prefect_environment(Path(".prefect").resolve())

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Shap-CAM saliency maps, their baselines and evaluation, as a pipeline.")


@app.callback()
def _main() -> None:
    """Shap-CAM saliency maps, their baselines and evaluation, as a pipeline."""
    from shapcam.runtime.cpu import tune_allocator

    tune_allocator()  # many large short-lived tensors: see shapcam.runtime.cpu


from . import dashboard, explain, runs, stored, training  # noqa: E402 - they register on `app`

__all__ = ["app", "dashboard", "explain", "runs", "stored", "training"]
