"""The flow that deployments schedule: one recurring dataset-wide run per trigger.

A deployment stores parameters, not a task runner, so this small parent flow builds the Dask
runner when it starts, then runs ``explain-dataset`` as a subflow. ``config`` is a
:class:`tasks.config.RunConfig` as a dict (``shapcam serve`` validated it when it registered the
deployment). Each trigger gets its own run id (the scheduled start time) unless ``run_id`` is
given, in which case every trigger resumes, then re-uses, the same run.

Imports are absolute: a work-pool deployment (``prefect.yaml``) loads this file by its path,
outside the ``flows`` package.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.explain_dataset import explain_dataset
from flows.runtime import DEFAULT_WORKERS, new_run_id, run_dir_for, task_runner
from tasks.config import RunConfig


@flow(name="scheduled-explain", flow_run_name="scheduled {config[dataset]} run")
def scheduled_explain(config: dict[str, Any], store: str = "runs", run_id: str | None = None,
                      workers: int = DEFAULT_WORKERS, dask_address: str | None = None,
                      gpus: str | None = None) -> dict[str, Any]:
    """``shapcam run`` as a deployable flow: the same config, the same results."""
    cfg = RunConfig.from_dict(config)
    run_id = run_id or new_run_id(flow_run.scheduled_start_time)
    if cfg.dataset == "sample":
        from shapcam.zoo.weights import install_offline_weights

        install_offline_weights()
    runner = task_runner(dask_address, workers, cfg.threads or 1, device=cfg.device, gpus=gpus,
                         resources=cfg.task_resources, tasks_per_gpu=cfg.tasks_per_gpu)
    return explain_dataset.with_options(task_runner=runner)(
        run_dir=run_dir_for(store, run_id), run_id=run_id, config=cfg.to_dict())
