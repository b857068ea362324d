"""Training tasks: the distillation teacher, its maps, each student, the VOC fine-tuning; Table 4
and the training report.

Each task reads its inputs from the run folder, checkpoints there after every epoch (so a killed
task resumes from its last epoch when the flow is re-run with the same run id), writes one
Parquet row per epoch (``training/config=<name>/``) and returns a small summary. Run folders of
training flows are local paths (checkpoints are ``torch.save`` files). The science is in
:mod:`shapcam.training`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dashboards import render
from shapcam.data import open_dataset
from shapcam.errors import ShapCAMError
from shapcam.methods import METHOD_TITLES
from shapcam.runtime.cpu import tune_allocator
from shapcam.training.cifar import ImageSet, load_images, normalise
from shapcam.training.distillation import (
    METHOD_ROWS,
    PAPER_TABLE4,
    LossSettings,
    evaluate_classifier,
    parse_variants,
    train_student,
    train_teacher,
)
from shapcam.training.maps import teacher_maps
from shapcam.training.train import Checkpoint, Schedule, load_checkpoint
from shapcam.training.voc import finetune, save_voc_weights
from shapcam.training.wrn import wrn
from storage import open_run, write_training_epoch

from .config import DistillSpec, FinetuneSpec

TEACHER = "teacher"


def _prepare(device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    if device.startswith("cpu"):
        tune_allocator()


def _data(spec: DistillSpec) -> ImageSet:
    return load_images(spec.dataset, spec.root, spec.limit, spec.seed)


def distill_schedule(spec: DistillSpec, epochs: int) -> Schedule:
    """The WRN recipe with the spec's lr, batch and seed, compressed to ``epochs``."""
    base = Schedule(lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed)
    return base.scaled(epochs) if epochs != base.epochs else base


def _recorder(run_dir: str, run_id: str, config: str):
    return lambda row: write_training_epoch(run_dir, config, {**row, "run_id": run_id})


def _teacher(run_dir: str, spec: DistillSpec) -> nn.Module:
    model = wrn(spec.teacher)
    path = spec.teacher_checkpoint or str(Path(run_dir) / "checkpoints" / "teacher.pt")
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state.get("model", state))
    except (RuntimeError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ShapCAMError(f"checkpoint {path} does not fit the teacher {spec.teacher}: "
                           f"{reason}") from None
    return model.eval()


def teacher_task(run_dir: str, run_id: str, spec: DistillSpec) -> dict[str, Any]:
    """Train the teacher (CE, the same recipe) or check the given checkpoint; its test error.
    Every other task waits for it, so it may use the whole machine (``teacher_threads``)."""
    _prepare(spec.device, spec.teacher_threads or spec.threads)
    data = _data(spec)
    if spec.teacher_checkpoint:
        model = _teacher(run_dir, spec).to(spec.device)
        return {"config": TEACHER, **evaluate_classifier(model, data, device=spec.device)}
    torch.manual_seed(spec.seed)
    model = wrn(spec.teacher, len(data.classes))
    history = train_teacher(model, data, distill_schedule(spec, spec.teacher_epochs
                                                          or spec.epochs),
                            Checkpoint(Path(run_dir) / "checkpoints" / "teacher.pt"),
                            device=spec.device, on_epoch=_recorder(run_dir, run_id, TEACHER))
    return {"config": TEACHER, "test_error": history[-1]["test_error"],
            "epochs": len(history)}


def maps_path(run_dir: str, method: str) -> Path:
    return Path(run_dir) / "teacher_maps" / f"{method}.npy"


def teacher_maps_task(run_dir: str, run_id: str, spec: DistillSpec, method: str
                      ) -> dict[str, Any]:
    """The teacher's ``method`` maps of every training image (un-augmented), saved once."""
    path = maps_path(run_dir, method)
    if path.is_file():
        return {"method": method, "skipped": True}
    _prepare(spec.device, spec.threads)
    data = _data(spec)
    teacher = _teacher(run_dir, spec).to(spec.device)
    x = normalise(torch.from_numpy(data.train_x).permute(0, 3, 1, 2).float() / 255
                  ).to(spec.device)
    y = torch.from_numpy(data.train_y).to(spec.device)
    options = ({"max_channels": spec.scorecam_channels} if method == "scorecam"
               else {})
    maps = teacher_maps(teacher, method, x, y, **options).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, maps)
    tmp.replace(path)
    return {"method": method, "skipped": False, "images": len(maps)}


def student_task(run_dir: str, run_id: str, spec: DistillSpec, variant: str
                 ) -> dict[str, Any]:
    """Train one student configuration (a Table 4 cell), resuming from its checkpoint."""
    _prepare(spec.device, spec.threads)
    (v,) = parse_variants(variant)
    data = _data(spec)
    teacher = _teacher(run_dir, spec)
    tmaps = (torch.from_numpy(np.load(maps_path(run_dir, v.method)))
             if v.method else None)
    torch.manual_seed(spec.seed)  # every student starts from the same weights
    student = wrn(spec.student, len(data.classes))
    settings = LossSettings(alpha=spec.alpha, temperature=spec.temperature,
                            permutations=spec.permutations,
                            scorecam_channels=spec.scorecam_channels)
    history = train_student(student, teacher, data, v, distill_schedule(spec, spec.epochs),
                            Checkpoint(Path(run_dir) / "checkpoints" / f"{v.name}.pt"),
                            teacher_maps=tmaps, settings=settings, device=spec.device,
                            on_epoch=_recorder(run_dir, run_id, v.name))
    return {"config": v.name, "test_error": history[-1]["test_error"], "epochs": len(history)}


def distill_table(run_dir: str, title: str, failed: dict[str, str] | None = None
                  ) -> render.Table:
    """Table 4's shape: rows = loss (CE, + each method's L_interpret), columns = without /
    with L_KD; final-epoch test error % (n/a where not run), the paper's next to it.
    ``failed``: configuration -> why it stopped (its cell reads "failed")."""
    failed = failed or {}
    df = open_run(run_dir).training()
    last = df.sort_values("epoch").groupby("config").tail(1).set_index("config")
    rows = []
    for m in METHOD_ROWS:
        name = m or "ce"
        label = "cross-entropy only" if m is None else f"+ {METHOD_TITLES[m]} L_interpret"
        ours = ["failed" if n in failed else float(last.loc[n, "test_error"])
                if n in last.index else None for n in (name, f"{name}+kd")]
        rows.append([label, *ours, *PAPER_TABLE4[m]])
    notes = []
    if TEACHER in last.index:
        notes.append(f"Teacher test error: {float(last.loc[TEACHER, 'test_error']):.2f} %")
    notes += [f"Configuration {name} failed: {why}" for name, why in failed.items()]
    return render.Table(title, ["test error %", "without L_KD", "with L_KD", "paper without",
                                "paper with"], rows, notes, digits=2)


def table_rows(table: render.Table) -> list[dict[str, Any]]:
    """The table as records (a Prefect table artifact)."""
    return [dict(zip(table.header, row, strict=True)) for row in table.rows]


def learning_curves_png(run_dir: str, metric: str = "test_error") -> bytes:
    """One line per configuration: ``metric`` against epoch, and the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = open_run(run_dir).training()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for config, part in df.groupby("config"):
        style = "--" if config.endswith("+kd") else "-"
        axes[0].plot(part["epoch"] + 1, part[metric], style, label=config)
        axes[1].plot(part["epoch"] + 1, part["train_loss"], style, label=config)
    axes[0].set(xlabel="epoch", ylabel=metric.replace("_", " "), title="test")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="train", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return render.png(fig, dpi=90)


def write_training_report(run_dir: str, table: render.Table, settings: dict[str, Any],
                          metric: str = "test_error") -> Path:
    """``report.html``: the table, the learning curves, the settings."""
    curves = base64.b64encode(learning_curves_png(run_dir, metric)).decode()
    body = (f"{render.html(table, level=1)}<h2>Learning curves</h2>"
            f"<img src='data:image/png;base64,{curves}'><h2>Settings</h2>"
            f"<pre>{json.dumps(settings, indent=1, default=str)}</pre>")
    path = Path(run_dir) / "report.html"
    path.write_text(render.page("training report", body))
    return path


# -- VOC2007 multi-label fine-tuning --------------------------------------------------------
def finetune_schedule(spec: FinetuneSpec) -> Schedule:
    return Schedule(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed,
                    milestones=(max(1, int(spec.epochs * 0.6)), max(1, int(spec.epochs * 0.8))),
                    gamma=0.1, weight_decay=5e-4, momentum=0.9)


def finetune_voc_task(run_dir: str, run_id: str, spec: FinetuneSpec) -> dict[str, Any]:
    """Fine-tune an ImageNet torchvision model on VOC2007 ``train_split`` (multi-label BCE),
    mAP on ``test_split`` per epoch; save ``<model>_voc.pth`` (state dict + VOC class names)."""
    _prepare(spec.device, spec.threads)
    train, test = ([r for r in open_dataset("voc", spec.root, split) if r.error is None]
                   for split in (spec.train_split, spec.test_split))
    if spec.limit:
        train, test = train[:spec.limit], test[:spec.limit]
    if not train or not test:
        raise ShapCAMError(f"no usable VOC images in {spec.root} (train {len(train)}, "
                           f"test {len(test)})")
    torch.manual_seed(spec.seed)
    model, history = finetune(spec.model, spec.weights, train, test, finetune_schedule(spec),
                              Checkpoint(Path(run_dir) / "checkpoints" / f"{spec.model}.pt"),
                              device=spec.device,
                              on_epoch=_recorder(run_dir, run_id, spec.model))
    out = save_voc_weights(model, spec.model, Path(run_dir) / f"{spec.model}_voc.pth")
    return {"config": spec.model, "test_map": history[-1]["test_map"], "weights": str(out),
            "epochs": len(history)}
