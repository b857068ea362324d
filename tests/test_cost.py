"""The cost model: passes per image per method, the linear projection from two calibration
points, and `shapcam run --dry-run`, which computes and writes nothing."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from shapcam.runtime.cost import _linear, calibrate, passes
from shapcam.zoo.models import LoadedModel


def test_the_projection_is_the_line_through_the_two_points():
    # 1 s at 4 masks, 3 s at 12: 0.25 s per mask -> 8000 masks: 1 + 7996 * 0.25
    assert _linear(1.0, 3.0, 4, 12, 8000) == pytest.approx(2000.0)
    # timer noise (the second point below the first): proportional to the knob instead
    assert _linear(1.0, 0.9, 4, 12, 8000) == pytest.approx(0.9 / 12 * 8000)


def test_calibration_points_move_up_out_of_the_noise(tiny, monkeypatch):
    """Timings under NOISE_SECONDS are not trusted: the upper point moves up (x4) until it
    stands out, or until it is the configured value, which is then timed itself."""
    import shapcam.runtime.cost as cost

    lm = LoadedModel(tiny, "tiny", "random", "features", [str(i) for i in range(5)])
    x = torch.randn(1, 3, 64, 64)
    asked: list[int] = []

    def cheap(_lm, method, options, _x):  # 1 ms per order, 0.05 s for the rest
        if method != "shapcam":
            return 0.05
        asked.append(options["permutations"])
        return 0.001 * options["permutations"]

    monkeypatch.setattr(cost, "_method_seconds", cheap)
    (c,) = calibrate(lm, ["shapcam"], {}, None, "scorecam", x)
    assert asked == [8, 64, 256] and c.map_seconds == pytest.approx(0.512)
    asked.clear()

    def noisy(_lm, method, options, _x):  # flat noise until the configured 512 orders
        asked.append(options["permutations"])
        return 0.146 if options["permutations"] == 512 else 0.05

    monkeypatch.setattr(cost, "_method_seconds", noisy)
    (c,) = calibrate(lm, ["shapcam"], {}, None, "scorecam", x)
    assert asked == [8, 64, 256, 512] and c.map_seconds == pytest.approx(0.146)


def test_passes_per_image_name_every_pass():
    assert passes("rise", {"n_masks": 2000}, 1280, 49, None) == \
        "1 + 2000 forwards; 2 forwards (Average Drop)"
    assert passes("scorecam", {}, 512, 49, 224) == \
        "1 + 512 forwards; 2 forwards (Average Drop) + 2 x 225 forwards (deletion, insertion)"
    assert passes("shapcam", {"permutations": 512}, 512, 196, None).startswith(
        "1 trunk forward + 512 x 196 head evaluations")
    assert passes("mask", {}, 512, 49, None).startswith("1 + 500 x (forward + backward)")


def test_calibration_gives_every_method_its_cost(tiny):
    lm = LoadedModel(tiny, "tiny", "random", "features", [str(i) for i in range(5)])
    x = torch.randn(2, 3, 64, 64)
    methods = ["gradcam", "rise", "scorecam", "shapcam", "mask"]
    costs = calibrate(lm, methods, {"rise": {"n_masks": 200}}, 1024, "scorecam", x)
    assert [c.method for c in costs] == methods
    assert all(c.map_seconds > 0 and c.metric_seconds > 0 for c in costs)
    assert len({c.metric_seconds for c in costs}) == 1  # the same forwards for every map
    assert costs[1].passes.startswith("1 + 200 forwards")
    assert costs[2].passes.startswith("1 + 8 forwards")  # every channel of the tiny CNN


@pytest.mark.real_weights
def test_dry_run_prints_the_plan_and_runs_nothing(mobilenet, tmp_path):
    from flows.cli import app

    res = CliRunner().invoke(app, ["run", "--dry-run", "--root", str(tmp_path / "data"),
                                   "--methods", "gradcam,shapcam", "--no-causal", "--store",
                                   str(tmp_path / "runs"), "--n-images", "4"])
    assert res.exit_code == 0, res.output
    assert "| method | passes per image (maps; metrics) | maps s | metrics s | total s |" \
        in res.output
    assert "| shapcam | 1 trunk forward + 512 x 49 head evaluations; 2 forwards" in res.output
    found = re.search(r"projected: sample \(4 images\) x 1 model\(s\), preset paper: "
                      r"([0-9.]+) s \(([0-9.]+) h\) for one worker", res.output)
    assert found and float(found.group(1)) > 0, res.output
    assert not (tmp_path / "runs").exists()
    # without the dataset, --n-images projects that many images
    res = CliRunner().invoke(app, ["run", "--dry-run", "--dataset", "imagenet", "--root",
                                   str(tmp_path / "missing"), "--methods", "gradcam",
                                   "--no-causal", "--n-images", "2000"])
    assert res.exit_code == 0, res.output
    assert "2000 images of imagenet (not read)" in res.output
