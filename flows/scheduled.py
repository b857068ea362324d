"""The flow that deployments schedule: one recurring dataset-wide run per trigger.

A deployment stores parameters, not a task runner, so this small parent flow builds the run's
config and Dask runner when it starts, then runs ``explain-dataset`` as a subflow on them. Each
trigger gets its own run id (the scheduled start time) unless ``run_id`` is given, in which case
every trigger resumes, then re-uses, the same run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from .explain_dataset import explain_dataset
from .runtime import ALL_METHODS, DEFAULT_WORKERS, new_run_id, run_config, run_dir_for, task_runner


@flow(name="scheduled-explain", flow_run_name="scheduled {dataset} run")
def scheduled_explain(
    dataset: str = "sample", root: str | None = None, split: str = "test",
    models: str = "mobilenet_v2:IMAGENET1K_V1", methods: str = ALL_METHODS,
    n_images: int | None = None, shard_size: int = 8, seed: int = 0,
    protocol: str = "scorecam", causal: bool = True, preset: str = "paper",
    settings: list[str] | None = None, store: str = "runs", run_id: str | None = None,
    device: str = "cpu", workers: int = DEFAULT_WORKERS, threads: int = 1,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """``shapcam run`` as a deployable flow: the same options, the same results."""
    config = run_config(dataset=dataset, root=root, split=split, models=models,
                        methods=methods, n_images=n_images, shard_size=shard_size, seed=seed,
                        protocol=protocol, causal=causal, preset=preset, settings=settings,
                        device=device, threads=threads)
    run_id = run_id or new_run_id(flow_run.scheduled_start_time)
    if dataset == "sample":
        from shapcam.weights import install_offline_weights

        install_offline_weights()
    runner = task_runner(dask_address, workers, threads)
    return explain_dataset.with_options(task_runner=runner)(
        run_dir=run_dir_for(store, run_id), run_id=run_id, config=config)
