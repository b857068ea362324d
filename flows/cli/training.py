"""Training commands: ``distill`` (paper Table 4) and ``finetune-voc``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tasks.config import DistillSpec, FinetuneSpec

from ..runtime import DEFAULT_WORKERS, run_flow, task_runner
from . import app
from .common import DaskAddress, RunId, Threads, Workers, fail, local_run_dir, user_errors

_DS = DistillSpec(dataset="digits")
_FT = FinetuneSpec(root="")
Store = Annotated[str, typer.Option(help="Folder holding the runs.")]
Device = Annotated[str, typer.Option(help="cpu or cuda.")]


def training_runner(dask_address: str | None, workers: int, threads: int, device: str) -> Any:
    """Training tasks address their device themselves (``cuda:N``): local workers see every
    GPU and declare the resource the tasks ask for (one ``GPU`` with CUDA)."""
    from tasks.config import device_resources

    return task_runner(dask_address, workers, threads, resources=device_resources(device))


@app.command()
def distill(
    dataset: Annotated[str, typer.Option(
        help="cifar10 (needs --root) or digits (sklearn's 8x8 digits at 32x32, offline).")
    ] = "cifar10",
    root: Annotated[Path | None, typer.Option(
        help="Folder holding cifar-10-batches-py (as torchvision's CIFAR10 reads it).")] = None,
    variants: Annotated[str, typer.Option(
        help="Table 4 cells: all, or some of ce, ce+kd, gradcam, gradcam+kd, gradcampp, "
             "gradcampp+kd, scorecam, scorecam+kd, shapcam, shapcam+kd.")] = _DS.variants,
    epochs: Annotated[int, typer.Option(
        help="Student epochs; the lr milestones 60/120/160 of 200 scale with it.")
    ] = _DS.epochs,
    teacher_epochs: Annotated[int | None, typer.Option(
        help="Teacher epochs (default: --epochs).")] = None,
    teacher_checkpoint: Annotated[Path | None, typer.Option(
        help="Use this trained WRN-40-2 state dict instead of training the teacher.")] = None,
    lr: Annotated[float, typer.Option(help="SGD learning rate (WRN recipe: 0.1).")] = _DS.lr,
    batch_size: Annotated[int, typer.Option(help="Batch size (WRN recipe: 128).")
                          ] = _DS.batch_size,
    alpha: Annotated[float, typer.Option(
        help="Weight of L_interpret (not given in the paper; our default 1).")] = _DS.alpha,
    temperature: Annotated[float, typer.Option(help="KD temperature (paper: 4).")
                           ] = _DS.temperature,
    permutations: Annotated[int, typer.Option(
        "--permutations", "-k", help="Shap-CAM orders per step for the student's map.")
    ] = _DS.permutations,
    scorecam_channels: Annotated[int, typer.Option(
        help="Score-CAM channel rule for teacher and student maps: the N most varied "
             "channels (0: all 128; the student pays one forward per channel, image and step).")
    ] = _DS.scorecam_channels or 0,
    limit: Annotated[int | None, typer.Option(
        help="Use the first N training images (and N/5 test images).")] = None,
    seed: Annotated[int, typer.Option()] = _DS.seed,
    store: Store = "runs", run_id: RunId = None, device: Device = _DS.device,
    workers: Workers = DEFAULT_WORKERS, threads: Threads = _DS.threads,
    dask_address: DaskAddress = None,
) -> None:
    """Paper Table 4: train a WRN-40-2 teacher and WRN-16-2 students with explanation losses."""
    from shapcam.training.cifar import cifar_folder

    from ..training import distill as distill_flow

    with user_errors():
        spec = DistillSpec(
            dataset=dataset, root=str(root.resolve()) if root else None, limit=limit, seed=seed,
            teacher_checkpoint=str(teacher_checkpoint.resolve()) if teacher_checkpoint
            else None, epochs=epochs, teacher_epochs=teacher_epochs, lr=lr,
            batch_size=batch_size, alpha=alpha, temperature=temperature,
            permutations=permutations, scorecam_channels=scorecam_channels or None,
            variants=variants,
            device=device, threads=threads,
            # the teacher trains alone: on a local cluster it gets every worker's threads
            teacher_threads=threads if dask_address else threads * workers)
        if spec.dataset == "cifar10":
            cifar_folder(spec.root)
    if teacher_checkpoint is not None and not teacher_checkpoint.is_file():
        fail(f"teacher checkpoint {teacher_checkpoint} does not exist")
    if teacher_checkpoint is not None:
        from shapcam.training.train import load_checkpoint

        with user_errors():  # before any server starts: a hostile pickle is one line
            load_checkpoint(teacher_checkpoint)
    run_dir, run_id = local_run_dir(store, run_id)
    typer.echo(f"run {run_id}, folder {run_dir}")
    with user_errors(resume=lambda: f"resume from the checkpoints with --run-id {run_id}"):
        result = run_flow(distill_flow,
                          training_runner(dask_address, workers, threads, spec.device),
                          typer.echo, run_dir=run_dir, run_id=run_id, spec=spec.to_dict())
    typer.echo("\n" + result["markdown"] + f"\n\nreport: {result['report']}")


@app.command("finetune-voc")
def finetune_voc(
    root: Annotated[Path, typer.Option(help="VOCdevkit (or VOC2007) folder.")],
    model: Annotated[str, typer.Option(help="torchvision classifier to fine-tune.")
                     ] = _FT.model,
    weights: Annotated[str, typer.Option(help="Its ImageNet weights (enum name).")
                       ] = _FT.weights,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = _FT.epochs,
    lr: Annotated[float, typer.Option(help="SGD learning rate.")] = _FT.lr,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = _FT.batch_size,
    train_split: Annotated[str, typer.Option(help="VOC split to train on.")] = _FT.train_split,
    test_split: Annotated[str, typer.Option(help="VOC split for mAP.")] = _FT.test_split,
    limit: Annotated[int | None, typer.Option(help="First N images of each split.")] = None,
    seed: Annotated[int, typer.Option()] = _FT.seed,
    store: Store = "runs", run_id: RunId = None, device: Device = _FT.device,
    threads: Threads = _FT.threads, dask_address: DaskAddress = None,
) -> None:
    """Fine-tune an ImageNet model on VOC2007 (20 classes, multi-label BCE); report mAP."""
    from shapcam.zoo.models import ensure_weights

    from ..training import finetune_voc as finetune_flow

    with user_errors():
        spec = FinetuneSpec(root=str(root.resolve()), model=model, weights=weights,
                            epochs=epochs, lr=lr, batch_size=batch_size,
                            train_split=train_split, test_split=test_split, limit=limit,
                            seed=seed, device=device, threads=threads)
        if dask_address is None:
            ensure_weights(spec.model, spec.weights)
    run_dir, run_id = local_run_dir(store, run_id)
    typer.echo(f"run {run_id}, folder {run_dir}")
    with user_errors(resume=lambda: f"resume with --run-id {run_id}"):
        result = run_flow(finetune_flow, training_runner(dask_address, 1, threads, spec.device),
                          typer.echo,
                          run_dir=run_dir, run_id=run_id, spec=spec.to_dict())
    typer.echo("\n" + result["markdown"] + f"\nexplain with: shapcam run --dataset voc --root "
               f"{root} --models {model}:{result['weights']}")
