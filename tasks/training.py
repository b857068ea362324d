"""Training tasks: the distillation teacher, its maps, each student, and the VOC fine-tuning.

Each task reads its inputs from the run folder, checkpoints there after every epoch (so a killed
task resumes from its last epoch when the flow is re-run with the same run id), writes one
Parquet row per epoch (``training/config=<name>/``) and returns a small summary. Run folders of
training flows are local paths (checkpoints are ``torch.save`` files).
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shapcam.cpu import tune_allocator
from shapcam.distill.data import load_images, normalise
from shapcam.distill.experiment import (
    METHOD_ROWS,
    PAPER_TABLE4,
    LossSettings,
    evaluate_classifier,
    parse_variants,
    train_student,
    train_teacher,
)
from shapcam.distill.maps import teacher_maps
from shapcam.distill.train import Checkpoint, Schedule, fit
from shapcam.distill.wrn import wrn
from shapcam.evaluate import METHOD_TITLES
from storage import open_run, write_training_epoch

TEACHER = "teacher"


def _prepare(spec: dict[str, Any], threads: int | None = None) -> None:
    torch.set_num_threads(int(threads or spec.get("threads") or torch.get_num_threads()))
    if str(spec.get("device", "cpu")).startswith("cpu"):
        tune_allocator()


def _data(spec: dict[str, Any]):
    return load_images(spec["dataset"], spec.get("root"), spec.get("limit"), spec.get("seed", 0))


def _schedule(spec: dict[str, Any], epochs_key: str = "epochs") -> Schedule:
    base = Schedule(**{k: (tuple(v) if k == "milestones" else v)
                       for k, v in spec.get("schedule", {}).items()})
    epochs = spec.get(epochs_key)
    return base.scaled(int(epochs)) if epochs and int(epochs) != base.epochs else base


def _recorder(run_dir: str, run_id: str, config: str):
    return lambda row: write_training_epoch(run_dir, config, {**row, "run_id": run_id})


def _teacher(run_dir: str, spec: dict[str, Any]) -> nn.Module:
    model = wrn(spec.get("teacher", "wrn-40-2"))
    path = spec.get("teacher_checkpoint") or str(Path(run_dir) / "checkpoints" / "teacher.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state.get("model", state))
    return model.eval()


def teacher_task(run_dir: str, run_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Train the teacher (CE, the same recipe) or check the given checkpoint; its test error.
    Every other task waits for it, so it may use the whole machine (``teacher_threads``)."""
    _prepare(spec, spec.get("teacher_threads"))
    data, device = _data(spec), spec.get("device", "cpu")
    if spec.get("teacher_checkpoint"):
        model = _teacher(run_dir, spec).to(device)
        return {"config": TEACHER, **evaluate_classifier(model, data, device=device)}
    torch.manual_seed(spec.get("seed", 0))
    model = wrn(spec.get("teacher", "wrn-40-2"), len(data.classes))
    history = train_teacher(model, data, _schedule(spec, "teacher_epochs"),
                            Checkpoint(Path(run_dir) / "checkpoints" / "teacher.pt"),
                            device=device, on_epoch=_recorder(run_dir, run_id, TEACHER))
    return {"config": TEACHER, "test_error": history[-1]["test_error"],
            "epochs": len(history)}


def maps_path(run_dir: str, method: str) -> Path:
    return Path(run_dir) / "teacher_maps" / f"{method}.npy"


def teacher_maps_task(run_dir: str, run_id: str, spec: dict[str, Any], method: str
                      ) -> dict[str, Any]:
    """The teacher's ``method`` maps of every training image (un-augmented), saved once."""
    path = maps_path(run_dir, method)
    if path.is_file():
        return {"method": method, "skipped": True}
    _prepare(spec)
    data, device = _data(spec), spec.get("device", "cpu")
    teacher = _teacher(run_dir, spec).to(device)
    x = normalise(torch.from_numpy(data.train_x).permute(0, 3, 1, 2).float() / 255).to(device)
    y = torch.from_numpy(data.train_y).to(device)
    options = dict(spec.get("teacher_map_options", {}).get(method, {}))
    maps = teacher_maps(teacher, method, x, y, **options).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, maps)
    tmp.replace(path)
    return {"method": method, "skipped": False, "images": len(maps)}


def student_task(run_dir: str, run_id: str, spec: dict[str, Any], variant: str
                 ) -> dict[str, Any]:
    """Train one student configuration (a Table 4 cell), resuming from its checkpoint."""
    _prepare(spec)
    (v,) = parse_variants(variant)
    data, device = _data(spec), spec.get("device", "cpu")
    teacher = _teacher(run_dir, spec)
    tmaps = (torch.from_numpy(np.load(maps_path(run_dir, v.method)))
             if v.method else None)
    torch.manual_seed(spec.get("seed", 0))  # every student starts from the same weights
    student = wrn(spec.get("student", "wrn-16-2"), len(data.classes))
    history = train_student(student, teacher, data, v, _schedule(spec),
                            Checkpoint(Path(run_dir) / "checkpoints" / f"{v.name}.pt"),
                            teacher_maps=tmaps, settings=LossSettings(**spec.get("loss", {})),
                            device=device, on_epoch=_recorder(run_dir, run_id, v.name))
    return {"config": v.name, "test_error": history[-1]["test_error"], "epochs": len(history)}


def distill_table(run_dir: str, failed: dict[str, str] | None = None) -> dict[str, Any]:
    """Table 4's shape: rows = loss (CE, + each method's L_interpret), columns = without /
    with L_KD; final-epoch test error % (None where not run), the paper's next to it.
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
        rows.append({"loss": label, "without L_KD": ours[0], "with L_KD": ours[1],
                     "paper without": PAPER_TABLE4[m][0], "paper with": PAPER_TABLE4[m][1]})
    teacher = float(last.loc[TEACHER, "test_error"]) if TEACHER in last.index else None
    return {"rows": rows, "teacher": teacher, "failed": failed,
            "epochs": {c: int(r["epoch"]) + 1 for c, r in last.iterrows()}}


def table_markdown(table: dict[str, Any], title: str) -> str:
    def fmt(v):
        if isinstance(v, str):
            return v
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    lines = [f"### {title}", "", "| test error % | without L_KD | with L_KD | paper without | "
             "paper with |", "|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['loss']} | {fmt(r['without L_KD'])} | {fmt(r['with L_KD'])} | "
                     f"{fmt(r['paper without'])} | {fmt(r['paper with'])} |")
    if table["teacher"] is not None:
        lines.append(f"\nTeacher test error: {fmt(table['teacher'])} %")
    for name, why in table.get("failed", {}).items():
        lines.append(f"\nConfiguration {name} failed: {why}")
    return "\n".join(lines)


def learning_curves_png(run_dir: str, metric: str = "test_error") -> bytes:
    """One line per configuration: ``metric`` against epoch."""
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_training_report(run_dir: str, spec: dict[str, Any], markdown_table: str,
                          metric: str = "test_error") -> Path:
    """``report.html``: the table, the learning curves, the settings."""
    png = base64.b64encode(learning_curves_png(run_dir, metric)).decode()
    rows = [line for line in markdown_table.splitlines() if line.startswith("|")]
    html_rows = "".join(
        "<tr>" + "".join(f"<td>{c.strip()}</td>" for c in r.strip("|").split("|")) + "</tr>"
        for i, r in enumerate(rows) if i != 1)
    notes = "".join(f"<p>{line}</p>" for line in markdown_table.splitlines()
                    if line and not line.startswith(("|", "#")))
    path = Path(run_dir) / "report.html"
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>training report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{border:1px solid #ccc;"
        "padding:4px 8px}table{border-collapse:collapse}</style>"
        f"<h1>{spec.get('title', 'Training run')}</h1><table>{html_rows}</table>{notes}"
        f"<h2>Learning curves</h2><img src='data:image/png;base64,{png}'>"
        f"<h2>Settings</h2><pre>{json.dumps(spec, indent=1, default=str)}</pre>")
    return path


# -- VOC2007 multi-label fine-tuning --------------------------------------------------------
def _replace_classifier(model: nn.Module, classes: int) -> nn.Linear:
    """Swap the last Linear layer for a fresh one with ``classes`` outputs; return it."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    new = nn.Linear(last.in_features, classes)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    return new


def _voc_batches(records, batch_size: int, seed: int, epoch: int, train: bool, device: str):
    from shapcam.data import load_example

    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(records), generator=g).tolist() if train else list(
        range(len(records)))
    for s in range(0, len(order), batch_size):
        chunk = [records[i] for i in order[s:s + batch_size]]
        x = torch.stack([load_example(r)[0] for r in chunk])
        if train:
            flip = torch.rand(len(chunk), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.zeros(len(chunk), 20)
        for i, r in enumerate(chunk):
            y[i, list(r.labels)] = 1.0
        yield x.to(device), y.to(device)


@torch.no_grad()
def voc_map(model: nn.Module, records, device: str = "cpu", batch_size: int = 16
            ) -> dict[str, float]:
    """Mean over classes (with a positive) of the average precision, and the mean BCE."""
    from sklearn.metrics import average_precision_score

    model.eval()
    scores, targets = [], []
    for x, y in _voc_batches(records, batch_size, 0, 0, False, device):
        scores.append(model(x).float().cpu())
        targets.append(y.cpu())
    s, t = torch.cat(scores), torch.cat(targets)
    aps = [average_precision_score(t[:, c].numpy(), s[:, c].numpy())
           for c in range(t.shape[1]) if t[:, c].any()]
    return {"test_map": 100.0 * float(np.mean(aps)) if aps else math.nan,
            "test_loss": float(F.binary_cross_entropy_with_logits(s, t))}


def finetune_voc_task(run_dir: str, run_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune an ImageNet torchvision model on VOC2007 ``train_split`` (multi-label BCE),
    mAP on ``test_split`` per epoch; save ``<model>_voc.pth`` (state dict + VOC class names)."""
    from shapcam.data import open_dataset
    from shapcam.data.readers import VOC_CLASSES
    from shapcam.models import load_model

    _prepare(spec)
    device = spec.get("device", "cpu")
    train = [r for r in open_dataset("voc", spec["root"], spec.get("train_split", "trainval"))
             if r.error is None]
    test = [r for r in open_dataset("voc", spec["root"], spec.get("test_split", "test"))
            if r.error is None]
    if spec.get("limit"):
        train, test = train[:spec["limit"]], test[:spec["limit"]]
    if not train or not test:
        raise ValueError(f"no usable VOC images in {spec['root']} (train {len(train)}, "
                         f"test {len(test)})")
    torch.manual_seed(spec.get("seed", 0))
    model = load_model(spec.get("model", "vgg16"), spec.get("weights", "DEFAULT")).model
    _replace_classifier(model, len(VOC_CLASSES))
    model.to(device)
    schedule = _schedule(spec)
    name = spec.get("model", "vgg16")

    def loss(batch, epoch, step):
        x, y = batch
        bce = F.binary_cross_entropy_with_logits(model(x), y)
        return bce, {"loss": bce.item(), "bce": bce.item()}

    history = fit(model, schedule, Checkpoint(Path(run_dir) / "checkpoints" / f"{name}.pt"),
                  batches=lambda e: _voc_batches(train, schedule.batch_size, schedule.seed, e,
                                                 True, device),
                  loss=loss, evaluate=lambda: voc_map(model, test, device),
                  on_epoch=_recorder(run_dir, run_id, name))
    out = Path(run_dir) / f"{name}_voc.pth"
    torch.save({"state_dict": model.state_dict(), "categories": list(VOC_CLASSES),
                "num_classes": len(VOC_CLASSES), "model": name}, out)
    return {"config": name, "test_map": history[-1]["test_map"], "weights": str(out),
            "epochs": len(history)}
