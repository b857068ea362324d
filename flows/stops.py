"""Clean stops: SIGTERM (schedulers: systemd, Kubernetes, Slurm) and SIGINT (Ctrl-C) end a
command the same way, with nothing left behind.

:func:`stop_signals` turns the first of either signal into :class:`Stopped`, raised in the main
thread, so every ``finally`` and context manager on the way out runs: the flow engine closes the
Dask cluster (its running tasks die with its workers), the command marks the flow run and its
unfinished task runs **Cancelled** while the Prefect API is still up
(:func:`cancel_flow_run`), then the local Prefect server it started is stopped with its process
group. Later signals during that shutdown are ignored rather than interrupting it.

During a flow, Prefect's engine owns SIGTERM: it turns it into its own ``TerminationSignal``
(the run is then Crashed, tasks cancelled) and re-sends the signal to the handler that was there
before, ours, which raises :class:`Stopped` in its place.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any
from uuid import UUID


class Stopped(BaseException):  # noqa: N818 - like KeyboardInterrupt: not an error of the run
    """The command was asked to stop by ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Stopped` once inside the block (main thread only)."""
    state: dict[str, int | None] = {"signum": None}

    def handler(signum: int, frame: Any) -> None:
        if state["signum"] is None:
            state["signum"] = signum
            raise Stopped(signum)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class FlowRunRecorder:
    """An ``on_running`` hook that remembers the flow run's id (to cancel it on a stop)."""

    def __init__(self) -> None:
        self.flow_run_id: UUID | None = None

    def __call__(self, flow: Any, flow_run: Any, state: Any) -> None:
        self.flow_run_id = flow_run.id


def cancel_flow_run(flow_run_id: UUID, reason: str) -> None:
    """Mark the flow run and its unfinished task runs Cancelled (forced: the engine has already
    marked the run Crashed on its way out)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    unfinished = [StateType.PENDING, StateType.SCHEDULED, StateType.RUNNING]
    with get_client(sync_client=True) as client:
        for run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                    type=TaskRunFilterStateType(any_=unfinished)))):
            client.set_task_run_state(run.id, Cancelled(message=reason), force=True)
        client.set_flow_run_state(flow_run_id, Cancelled(message=reason), force=True)
