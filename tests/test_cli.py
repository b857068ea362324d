"""The command line on real photos, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from shapcam.data.photos import bundled_photo

runner = CliRunner()


@pytest.mark.real_weights
def test_explain_writes_overlays_and_arrays(mobilenet, tmp_path):
    paths = [str(bundled_photo(n).path) for n in ("chelsea", "coffee")]
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", *paths, "--model", "mobilenet_v2", "--weights",
                              "IMAGENET1K_V1", "--permutations", "8", "--seed", "3", "--out",
                              str(out)])
    assert res.exit_code == 0, res.output
    for stem in ("chelsea", "coffee"):
        assert (out / f"{stem}.shapcam.png").stat().st_size > 10_000
        data = np.load(out / f"{stem}.shapcam.npz")
        assert data["map"].shape == (224, 224)
        assert data["map"].min() >= 0 and data["map"].max() == pytest.approx(1.0)
        assert data["raw"].shape == data["stderr"].shape == (7, 7)
        assert int(data["permutations"]) == 8 and int(data["seed"]) == 3
        assert int(data["evaluations"]) == 2 + 8 * 48
        assert data["raw"].sum() == pytest.approx(float(data["v_full"] - data["v_empty"]),
                                                  abs=1e-5)
        assert 0 < float(data["probability"]) <= 1
    assert str(np.load(out / "coffee.shapcam.npz")["class_name"]) == "espresso"


@pytest.mark.real_weights
def test_target_by_name_and_bad_files_are_skipped(mobilenet, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not an image")
    good = str(bundled_photo("coffee").path)
    res = runner.invoke(app, ["explain", str(bad), good, "--weights", "IMAGENET1K_V1",
                              "--model", "mobilenet_v2", "-k", "4", "--target", "cup",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "notes.jpg is not a readable image" in res.output
    data = np.load(tmp_path / "o" / "coffee.shapcam.npz")
    assert int(data["target"]) == 968 and str(data["class_name"]) == "cup"


def test_errors_are_clear(tmp_path):
    img = str(bundled_photo("coffee").path)
    res = runner.invoke(app, ["explain", img, "--weights", "random", "--layer", "features.99",
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "layer 'features.99' does not exist" in res.output
    res = runner.invoke(app, ["explain", img, "--weights", "random", "--target", "unicorn",
                              "-k", "2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown class 'unicorn'" in res.output
    res = runner.invoke(app, ["explain", img, "--weights", "random", "-k", "0",
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "permutations must be an integer >= 1" in res.output
    res = runner.invoke(app, ["explain", img, "--weights", "random", "--method", "lime",
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown method 'lime'" in res.output
    res = runner.invoke(app, ["explain", str(tmp_path / "missing.png"), "--weights", "random",
                              "-k", "2", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "missing.png does not exist" in res.output


def test_baseline_methods_with_options(tmp_path):
    img = str(bundled_photo("coffee").path)
    res = runner.invoke(app, ["explain", img, "--weights", "random", "--method", "rise",
                              "--set", "n_masks=8", "--set", "batch_size=8", "--out",
                              str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = np.load(tmp_path / "coffee.rise.npz")
    assert data["map"].shape == (224, 224) and "stderr" not in data
    res = runner.invoke(app, ["explain", img, "--weights", "random", "--method", "gradcam",
                              "--set", "n_masks=8", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "bad option for gradcam" in res.output
    res = runner.invoke(app, ["explain", img, "--weights", "random", "--set", "oops"])
    assert res.exit_code == 2 and "--set expects METHOD.KEY=VALUE" in res.output


@pytest.mark.real_weights
def test_evaluate_prints_the_papers_table(mobilenet, tmp_path):
    import json

    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["evaluate", "--dataset", "sample", "--root", str(tmp_path / "s"),
                              "--methods", "gradcam,shapcam", "--n-images", "2",
                              "--set", "shapcam.permutations=16", "--no-causal",
                              "--protocol", "gradcampp", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "| metric | Grad-CAM | Shap-CAM |" in res.output
    assert "protocol `gradcampp`" in res.output and "(2 images, seed 0)" in res.output
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and {r["protocol"] for r in data["rows"]} == {"gradcampp"}
    drops = [r["avg_drop"] for r in data["rows"] if r["method"] == "gradcam"]
    avg = data["table"]["rows"][0]["values"][0]
    assert abs(avg - sum(drops) / 2) < 1e-9
    assert all(0 <= r["avg_drop"] <= 100 for r in data["rows"])


def test_evaluate_rejects_bad_arguments(tmp_path):
    res = runner.invoke(app, ["evaluate", "--protocol", "paper", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "unknown protocol 'paper'" in res.output
    res = runner.invoke(app, ["evaluate", "--dataset", "voc", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "ImageSets/Main" in res.output
    res = runner.invoke(app, ["evaluate", "--methods", "gradcam", "--set", "rise.n_masks=4",
                              "--root", str(tmp_path)])
    assert res.exit_code == 2 and "--set rise.n_masks" in res.output


def test_workers_dying_again_and_again_is_one_line_with_the_way_on(capsys):
    import typer
    from distributed import KilledWorker

    from flows.cli.common import user_errors

    with pytest.raises(typer.Exit) as info, user_errors(resume=lambda: "resume with --run-id r"):
        raise KilledWorker("process_shard-1f2e", "tcp://127.0.0.1:1", 3)
    err = capsys.readouterr().err
    assert info.value.exit_code == 2 and len(err.strip().splitlines()) == 1
    assert "process_shard-1f2e" in err and "--dry-run" in err and "--run-id r" in err
