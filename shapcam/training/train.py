"""One trainer for the distillation students, the teacher and the VOC fine-tuning: SGD with
momentum and weight decay, a step schedule, a checkpoint after every epoch, resume from it.

An epoch's batches and random draws depend only on ``(seed, epoch)`` and the model/optimizer
state is restored whole, so a run killed after epoch ``e`` and resumed ends with the same weights
as an uninterrupted run (tested).
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ShapCAMError

Batch = tuple[Any, ...]


@dataclass
class Schedule:
    """The standard WRN recipe (Zagoruyko & Komodakis 2016): SGD lr 0.1, momentum 0.9, weight
    decay 5e-4, 200 epochs, lr x 0.2 at epochs 60, 120 and 160, batch 128."""

    epochs: int = 200
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (60, 120, 160)
    gamma: float = 0.2
    batch_size: int = 128
    seed: int = 0

    def scaled(self, epochs: int) -> Schedule:
        """The same schedule compressed to ``epochs`` (milestones at the same fractions)."""
        ms = tuple(sorted({max(1, round(m * epochs / self.epochs)) for m in self.milestones
                           if round(m * epochs / self.epochs) < epochs}))
        return Schedule(epochs, self.lr, self.momentum, self.weight_decay, ms, self.gamma,
                        self.batch_size, self.seed)


@dataclass
class Checkpoint:
    """Where a model's training state lives; written atomically after every epoch."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, epoch: int,
             extra: dict[str, Any] | None = None) -> None:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch, "history": self.history,
                    **(extra or {})}, buf)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, self.path)  # a kill leaves the previous checkpoint intact

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state = load_checkpoint(self.path)
        self.history = list(state.get("history", []))
        return state


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A training checkpoint (or a bare state dict) as a dict, read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, so a file whose
    pickle would run code on load (a replaced or hostile checkpoint) is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShapCAMError(f"cannot read checkpoint {path}: {reason[:300]} (only tensors and "
                           "plain containers are loaded; a file that needs code to load is "
                           "refused)") from None
    if not isinstance(state, dict):
        raise ShapCAMError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def fit(model: nn.Module, schedule: Schedule, checkpoint: Checkpoint, *,
        batches: Callable[[int], Iterable[Batch]],
        loss: Callable[[Batch, int, int], tuple[torch.Tensor, dict[str, float]]],
        evaluate: Callable[[], dict[str, float]],
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        stop_after: int | None = None, params: Iterable[nn.Parameter] | None = None
        ) -> list[dict[str, Any]]:
    """Train ``model`` for ``schedule.epochs`` epochs, resuming from ``checkpoint``.

    ``batches(epoch)`` yields the epoch's batches; ``loss(batch, epoch, step)`` returns the
    loss to minimise and its named parts (floats, averaged into the epoch's row);
    ``evaluate()`` returns test metrics. Each finished epoch appends a row (epoch, lr, parts,
    test metrics, seconds) to the history, saves the checkpoint and calls ``on_epoch(row)``.
    ``stop_after`` ends after that many epochs of *this call* (to test resuming).
    """
    opt = torch.optim.SGD(list(params) if params is not None else model.parameters(),
                          lr=schedule.lr, momentum=schedule.momentum,
                          weight_decay=schedule.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(schedule.milestones), schedule.gamma)
    start = 0
    state = checkpoint.load()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["epoch"]) + 1
    for done, epoch in enumerate(range(start, schedule.epochs)):
        if stop_after is not None and done >= stop_after:
            break
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        lr = opt.param_groups[0]["lr"]
        for step, batch in enumerate(batches(epoch)):
            value, parts = loss(batch, epoch, step)
            if not math.isfinite(value.item()):
                raise FloatingPointError(f"loss is {value.item()} at epoch {epoch} step {step}: "
                                         "lower the learning rate or alpha")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
        sched.step()
        model.eval()
        row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v / max(1, steps)
                                             for k, v in sums.items()},
               **evaluate(), "seconds": time.perf_counter() - t0}
        checkpoint.history.append(row)
        checkpoint.save(model, opt, sched, epoch, {"schedule": asdict(schedule)})
        if on_epoch is not None:
            on_epoch(row)
    return checkpoint.history
