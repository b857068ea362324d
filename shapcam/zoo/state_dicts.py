"""State-dict files of a model (``--weights PATH``): read safely (``weights_only``: a pickle
cannot run code), checked key by key against the architecture, with what would fit."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ShapCAMError


def is_path(spec: str) -> bool:
    """Whether a weights spec names a file rather than an enum or ``random``."""
    return os.path.sep in spec or spec.endswith((".pth", ".pt", ".bin")) or Path(spec).is_file()


def checkpoint_meta(path: Path) -> dict:
    """``num_classes`` and ``categories`` saved next to the state dict, if any."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - reported with its reason by load_state_dict_file
        return {}
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return {k: state[k] for k in ("num_classes", "categories") if k in state}
    return {}


def load_state_dict_file(model: nn.Module, name: str, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle of something else, ...
        raise ShapCAMError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ShapCAMError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            details.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, "
                f"{name} {tuple(own[k].shape)})"
            )
        raise ShapCAMError(
            f"weights file {path} does not fit architecture {name!r}: {'; '.join(details)}. "
            f"Pass the model name the file was trained with, or --num-classes if only the "
            "classifier differs"
        )
    model.load_state_dict(state)
