"""Several classes per image: --target topk:K and present, and their bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from shapcam import GradCAM, load_model
from shapcam.data import ImageRecord
from shapcam.data.images import load_batch
from shapcam.data.photos import bundled_photo
from shapcam.errors import ShapCAMError
from shapcam.evaluation.evaluate import evaluate_records, stored_precision, summary_table
from shapcam.evaluation.metrics import confidence_metrics
from shapcam.evaluation.targets import TargetSpec

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def lm():
    return load_model("timm:test_resnet", "random")


def _record(name: str, label: int, labels=(), boxes=None) -> ImageRecord:
    return ImageRecord(f"r_{name}", bundled_photo(name).path, label,
                       boxes=boxes or {}, labels=tuple(labels), size=(300, 300))


def test_parse():
    assert TargetSpec.parse("topk:3") == TargetSpec("topk", 3)
    assert TargetSpec.parse("present").multiple and not TargetSpec.parse("topk:1").multiple
    for bad, message in [("top3", "unknown --target 'top3'; use one of predicted, label, "
                                  "topk:K, present"),
                         ("topk:0", "topk needs a count >= 1"), ("topk:x", "topk needs")]:
        with pytest.raises(ShapCAMError, match=message):
            TargetSpec.parse(bad)


def test_topk_explains_each_class_on_its_own(lm):
    records = [_record("chelsea", 281), _record("coffee", 967)]
    rows = evaluate_records(lm, records, ["gradcam"], target="topk:3", causal=False)
    x, _ = load_batch([r.path for r in records])
    with torch.no_grad():
        top = lm.model(x).topk(3, dim=1).indices
    for b, rec in enumerate(records):
        mine = [r for r in rows if r.image_id == rec.image_id]
        assert [r.target for r in mine] == top[b].tolist() and all(r.error is None for r in mine)
        for j, row in enumerate(mine):  # the same as explaining and scoring that class alone
            t = top[b, j:j + 1]
            maps = stored_precision(GradCAM(lm)(x[b:b + 1], t).maps)
            want = confidence_metrics(lm.model, x[b:b + 1], maps, t)
            assert row.avg_drop == pytest.approx(float(want["avg_drop"][0]), abs=1e-5)
            assert row.y == pytest.approx(float(want["y"][0]), abs=1e-6)
    table = summary_table(rows, ["gradcam"])
    assert table["images"] == {"gradcam": 2} and table["explanations"] == {"gradcam": 6}


def test_present_explains_every_annotated_class_and_reports_the_rest(lm):
    box = np.array([[10.0, 10, 200, 200]], dtype=np.float32)
    records = [_record("chelsea", 281, labels=(281, 285), boxes={281: box, 285: box}),
               _record("coffee", -1)]  # no annotation at all
    rows = evaluate_records(lm, records, ["gradcam", "gradcampp"], target="present",
                            causal=False)
    first = [r for r in rows if r.image_id == "r_chelsea"]
    assert sorted((r.method, r.target) for r in first) == [
        ("gradcam", 281), ("gradcam", 285), ("gradcampp", 281), ("gradcampp", 285)]
    failed = [r for r in rows if r.image_id == "r_coffee"]
    assert len(failed) == 2 and all("the image has no annotated class" in r.error
                                    for r in failed)
    bad = evaluate_records(lm, [_record("chelsea", 5000)], ["gradcam"], target="label",
                           causal=False)
    assert "class 5000 is not one of the model's 1000" in bad[0].error


def test_cli_evaluate_topk(tmp_path):
    res = CliRunner().invoke(app, ["evaluate", "--root", str(tmp_path / "data"), "--model",
                                   "timm:test_resnet", "--weights", "random", "--methods",
                                   "gradcam", "--n-images", "2", "--no-causal", "--target",
                                   "topk:2"])
    assert res.exit_code == 0, res.output
    assert "target: topk:2 (4 image-class pairs) class" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--root", str(tmp_path / "data"), "--model",
                                   "timm:test_resnet", "--weights", "random", "--methods",
                                   "gradcam", "--target", "top2"])
    assert res.exit_code != 0 and "unknown --target 'top2'" in res.output
    assert "Traceback" not in res.output


def test_pipeline_topk_store_has_a_class_axis_equal_to_the_plain_loop(tmp_path):
    """Maps written per (image, class) slot, metrics read back from them (the evaluate step
    reads the store), the query API selecting by slot, all equal to the plain loop."""
    from test_pipeline import assert_float16_of, config_for, run_all

    from shapcam.data import draw_records, open_dataset
    from storage import SaliencyStore, open_run

    model = {"name": "timm:test_resnet", "weights": "random", "layer": None}
    config = config_for(tmp_path / "data", n_images=3, shard_size=2, models=[model],
                        methods=["gradcam"], method_options={}, target="topk:2")
    run_all(tmp_path / "run", config)
    spec, _ = SaliencyStore(tmp_path / "run").table("sample", "timm:test_resnet")
    assert spec.n_targets == 2
    run = open_run(tmp_path / "run")
    images = run.images("sample", "timm:test_resnet")
    da = run.maps("sample", "timm:test_resnet", "gradcam")
    assert da.dims == ("image", "class", "y", "x") and da.shape == (3, 2, 224, 224)
    second = run.maps("sample", "timm:test_resnet", "gradcam", slot=1)
    records = draw_records(open_dataset("sample", tmp_path / "data"), 3, 0)
    plain = evaluate_records(lm_for(model), records, ["gradcam"], target="topk:2",
                             causal=False)
    df = run.metrics()
    assert len(df) == 6 and sorted(df["target"]) == sorted(r.target for r in plain)
    for row in plain:
        got = df[(df["image_id"] == row.image_id) & (df["target"] == row.target)].iloc[0]
        assert got["avg_drop"] == pytest.approx(row.avg_drop, abs=1e-5)
    for rec in records:
        classes = images.loc[images["image_id"] == rec.image_id, "targets"].iloc[0]
        assert classes == [r.target for r in plain if r.image_id == rec.image_id]
        x, _ = load_batch([rec.path])
        want = GradCAM(lm_for(model))(x, torch.tensor([classes[1]])).maps[0].numpy()
        assert_float16_of(second.sel(image=rec.image_id).values, want)
    from dashboards import data  # the dashboard's image table and panel, class 2 of 2

    assert data.class_slots(run, "sample", "timm:test_resnet") == 2
    table = data.image_table(run, "sample", "timm:test_resnet", "scorecam", slot=1)
    for row in plain:
        mine = table[table["image_id"] == row.image_id].iloc[0]
        if mine["target"] == row.target:
            assert mine["avg_drop:gradcam"] == pytest.approx(row.avg_drop, abs=1e-5)
    first = table.iloc[0]
    view = data.image_view(run, "sample", "timm:test_resnet", first["image_id"], table)
    np.testing.assert_array_equal(view.maps["gradcam"], second.sel(
        image=first["image_id"]).values.astype(np.float32))
    with pytest.raises(Exception, match="slot 2 does not exist"):
        run.maps("sample", "timm:test_resnet", "gradcam", slot=2)
    assert "class" not in SaliencyStore(tmp_path / "run").table(
        "sample", "timm:test_resnet")[1]["images"]["width"].metadata.dimension_names


def lm_for(model):
    return load_model(model["name"], model["weights"])


@pytest.mark.slow
def test_flow_runs_a_topk_run_with_field_metrics(tmp_path, shared_api):
    """Through the Prefect flow on Dask workers: --target topk:2 and --metrics (the metrics
    read back from the stored per-class maps: test_pipeline_topk_store_...)."""
    from test_flow import shapcam_run

    from storage import SaliencyStore, open_run

    proc = shapcam_run(tmp_path, "multi", "--models", "timm:test_resnet:random", "--methods",
                       "gradcam", "--n-images", "3", "--target", "topk:2", "--metrics",
                       "sparseness,complexity", api=shared_api)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    run_dir = tmp_path / "runs" / "multi"
    spec, _ = SaliencyStore(run_dir).table("sample", "timm:test_resnet")
    assert spec.n_targets == 2
    counts = open_run(run_dir).sql(
        "select count(*) as n, count(distinct image_id) as images, count(sparseness) as sparse "
        "from metrics")
    assert counts.to_dict("records") == [{"n": 6, "images": 3, "sparse": 6}]
    pairs = open_run(run_dir).sql("select image_id, target from metrics where protocol = "
                                  "'scorecam' order by image_id, target")
    images = open_run(run_dir).images("sample", "timm:test_resnet")
    want = sorted((i, t) for i, ts in zip(images["image_id"], images["targets"], strict=True)
                  for t in ts)
    assert list(map(tuple, pairs.to_numpy().tolist())) == want
