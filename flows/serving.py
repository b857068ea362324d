"""``shapcam serve``'s loop: Prefect's runner for one deployment, stopped cleanly.

Prefect's ``serve`` waits for a flow run in progress to end (its subprocess, its Dask workers)
before it returns, and owns SIGTERM. Here both SIGTERM and SIGINT stop at once, while the
Prefect API is still up: every process this command started in its own session is stopped
(the flow-run subprocess and its Dask workers; the local Prefect server, in a session of its
own, is stopped afterwards by its context), the deployment's flow runs that were in progress
(and their task runs) are marked **Cancelled**, the runner's loop is ended from inside (as
Prefect's own SIGTERM handler does), then :class:`~flows.stops.Stopped` is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any
from uuid import UUID

from .stops import Stopped, cancel_flow_run


def serve_until_stopped(deployment: Any) -> None:
    """Serve ``deployment`` (a Prefect ``RunnerDeployment``) until SIGTERM or SIGINT."""
    from prefect.runner import Runner

    runner = Runner()
    deployment_id = runner.add_deployment(deployment)
    graceful = runner.handle_sigterm  # Prefect's: stops the runner's loop from inside
    state: dict[str, int] = {}

    def stop(signum: int, frame: Any = None) -> None:
        if state:  # a second signal during the shutdown: ignored
            return
        state["signum"] = signum
        reason = f"shapcam serve stopped by {signal.Signals(signum).name}"
        runs: list[UUID] = []
        with contextlib.suppress(Exception):  # the stop matters more than the label
            runs = unfinished_flow_runs(deployment_id)
        stop_own_processes()  # first: a dying engine reports Crashed, then the label
        with contextlib.suppress(Exception):
            for flow_run_id in runs:
                cancel_flow_run(flow_run_id, reason)
        graceful()  # nothing left to wait for: the loop ends at once

    runner.handle_sigterm = stop  # the runner installs it for SIGTERM when it starts
    previous = signal.signal(signal.SIGINT, stop)
    try:
        asyncio.run(runner.start())
    except SystemExit:  # Prefect's handler before the runner started
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    if state:
        raise Stopped(state["signum"])


def unfinished_flow_runs(deployment_id: UUID) -> list[UUID]:
    """Pending or running flow runs of the deployment, and their subflow runs (its future
    scheduled runs stay scheduled)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    unfinished = FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.PENDING, StateType.RUNNING]))
    with get_client(sync_client=True) as client:
        ids = [r.id for r in client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=unfinished))]
        if ids:
            ids += [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=ids), state=unfinished))]
    return ids


def stop_own_processes(timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` s, to every descendant of this process in its
    session (processes started with a session of their own stop with their owner)."""
    import psutil

    session = os.getsid(0)
    own = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(child.pid) == session:
                own.append(child)
    for p in own:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(own, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
