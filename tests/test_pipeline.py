"""The pipeline's units (plan, explain shard, evaluate shard, aggregate) without Prefect:
equal to the plain evaluation loop, resumable, tolerant of bad images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shapcam.data import draw_records, open_dataset
from shapcam.evaluate import evaluate_records
from storage import SaliencyStore, open_run
from tasks.config import RunConfig
from tasks.pipeline import aggregate, evaluate_shard, explain_shard, plan_run


def config_for(root, **extra):
    return RunConfig.from_dict({
            "dataset": "sample", "root": str(root), "n_images": 4, "seed": 0, "shard_size": 2,
            "models": [{"name": "mobilenet_v2", "weights": "IMAGENET1K_V1", "layer": None}],
            "methods": ["gradcam", "shapcam"], "method_options": {"shapcam":
                                                                   {"permutations": 8}},
            "protocol": "scorecam", "causal": False, "device": "cpu", **extra})


def run_all(run_dir, config):
    plan = plan_run(str(run_dir), "run-test", config)
    out = []
    for k, records in enumerate(plan["shards"]):
        out.append(explain_shard(str(run_dir), config, config.models[0], k, records))
        out.append(evaluate_shard(str(run_dir), config, config.models[0], k, records))
    return plan, out, aggregate(str(run_dir), config)


@pytest.mark.real_weights
def test_pipeline_equals_the_plain_loop(mobilenet, tmp_path):
    config = config_for(tmp_path / "data")
    plan, summaries, tables = run_all(tmp_path / "run", config)
    assert len(plan["shards"]) == 2 and not any(s["skipped"] for s in summaries)
    records = draw_records(open_dataset("sample", tmp_path / "data"), 4, 0)
    plain = evaluate_records(mobilenet, records, ["gradcam", "shapcam"],
                             method_options={"shapcam": {"permutations": 8}}, causal=False)
    df = open_run(tmp_path / "run").metrics()
    assert len(df) == len(plain) == 8
    for row in plain:
        got = df[(df["method"] == row.method) & (df["image_id"] == row.image_id)].iloc[0]
        assert got["target"] == row.target and got["pointing"] == row.pointing
        for key in ("y", "o", "avg_drop", "increase"):
            # equal up to float32 rounding (batches of 2 vs 4 images through the model)
            assert got[key] == pytest.approx(getattr(row, key), rel=1e-5, abs=1e-6), key
        if math.isnan(row.proportion):
            assert got["proportion"] is None or math.isnan(got["proportion"])
        else:
            assert got["proportion"] == pytest.approx(row.proportion, rel=1e-5, abs=1e-6)
    assert tables["mobilenet_v2"]["columns"] == ["Grad-CAM", "Shap-CAM"]
    summary = open_run(tmp_path / "run").sql("select count(*) as n from summary")
    assert int(summary["n"][0]) == 14  # (5 metrics + 2 pointing-game counts) x 2 methods
    # rerun: every shard is skipped, results unchanged
    _, again, _ = run_all(tmp_path / "run", config)
    assert all(s["skipped"] for s in again)
    assert open_run(tmp_path / "run").metrics().sort_values(["method", "image_id"])[
        "avg_drop"].tolist() == df.sort_values(["method", "image_id"])["avg_drop"].tolist()


@pytest.mark.real_weights
def test_bad_image_is_recorded_and_the_shard_completes(mobilenet, tmp_path):
    from shapcam.data.sample_dataset import build_sample_dataset

    root = build_sample_dataset(tmp_path / "data")
    bad = root / "ILSVRC/Data/CLS-LOC/val/sample_china.JPEG"
    bad.write_bytes(b"\xff\xd8 broken")
    config = config_for(tmp_path / "data", n_images=None, shard_size=3)
    run_all(tmp_path / "run", config)
    st = SaliencyStore(tmp_path / "run")
    assert all(st.shard_status("sample", "mobilenet_v2").values())
    df = open_run(tmp_path / "run").metrics()
    failed = df[df["error"].notna()]
    assert set(failed["image_id"]) == {"sample_china"} and len(failed) == 2
    assert "not a readable image" in failed["error"].iloc[0]
    maps = open_run(tmp_path / "run").maps("sample", "mobilenet_v2", "gradcam").load()
    ids = list(maps.coords["image"].values)
    assert np.isnan(maps.values[ids.index("sample_china")]).all()
    assert not np.isnan(maps.values[ids.index("sample_coffee")]).any()


@pytest.mark.real_weights
def test_resuming_with_other_map_options_is_refused(mobilenet, tmp_path):
    from shapcam.errors import ShapCAMError

    config = config_for(tmp_path / "data")
    plan_run(str(tmp_path / "run"), "run-test", config)
    plan_run(str(tmp_path / "run"), "run-test", config.replace(protocol="gradcampp"))  # fine
    other = config.replace(method_options={"shapcam": {"permutations": 64}})
    with pytest.raises(ShapCAMError, match=r"other options \(method_options=.*--run-id"):
        plan_run(str(tmp_path / "run"), "run-test", other)


def test_presets_fill_options_and_set_overrides_them():
    from shapcam.errors import ShapCAMError
    from shapcam.presets import PRESETS, resolve_preset

    options, step = resolve_preset("quick", ["rise", "gradcam", "scorecam"],
                                   {"rise": {"n_masks": 64}, "gradcam": {}})
    assert options == {"rise": {"n_masks": 64}, "scorecam": {"max_channels": 128}}
    assert step == PRESETS["quick"].causal_step == 1792
    assert resolve_preset("paper", ["rise"], {}) == ({}, 224)
    with pytest.raises(ShapCAMError, match="unknown preset 'fast'.*paper, quick"):
        resolve_preset("fast", ["rise"], {})
