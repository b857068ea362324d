"""Hostile and careless input, round two: files from a user or a run folder run no code, run
ids never reach another run or outside the store, ``verify`` refuses what is not a run."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from shapcam.errors import ShapCAMError


class _Evil:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Evil(marker), "epoch": 0}, path)
    return path


def test_a_hostile_checkpoint_runs_no_code_through_any_entry_point(tmp_path):
    from shapcam.training.train import Checkpoint, load_checkpoint
    from tasks.config import DistillSpec
    from tasks.training import _teacher

    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(ShapCAMError, match="cannot read checkpoint .*evil.pth"):
        load_checkpoint(evil)
    with pytest.raises(ShapCAMError, match="cannot read checkpoint"):
        Checkpoint(evil).load()  # a student's or teacher's checkpoint when resuming
    run_dir = tmp_path / "run"  # a distill run whose teacher.pt was replaced
    _evil_checkpoint(run_dir / "checkpoints" / "teacher.pt", marker)
    with pytest.raises(ShapCAMError, match="cannot read checkpoint"):
        _teacher(str(run_dir), DistillSpec(dataset="digits"))
    res = CliRunner().invoke(app, ["distill", "--dataset", "digits", "--teacher-checkpoint",
                                   str(evil), "--store", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "cannot read checkpoint" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()
    assert not marker.exists()


def test_a_hostile_cifar_batch_runs_no_code(tmp_path):
    from test_distill import write_cifar

    from shapcam.training.cifar import load_cifar10

    write_cifar(tmp_path, n=4)
    marker = tmp_path / "pwned"
    with (tmp_path / "cifar-10-batches-py" / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(ShapCAMError, match="data_batch_2.*posix.system is not allowed"):
        load_cifar10(tmp_path)
    assert not marker.exists()
