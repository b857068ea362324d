"""The pipeline's units (plan, explain shard, evaluate shard, aggregate) without Prefect:
equal to the plain evaluation loop, resumable, tolerant of bad images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shapcam.data import draw_records, open_dataset
from shapcam.evaluation.evaluate import evaluate_records
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


def assert_float16_of(stored: np.ndarray, want: np.ndarray) -> None:
    """``stored`` (float16 maps from the store) is ``want`` (the plain loop's float32 maps)
    rounded to float16, give or take one float16 step.

    Bit equality is not the promise: the pipeline computes a shard's images in batches, the
    plain loop one at a time, and CPU kernels sum in an order that depends on the batch shape
    (Grad-CAM's ``einsum`` over channels differs by ~5e-10 between a batch of 2 and of 1), so
    a value within that distance of a float16 rounding boundary lands on the next step.
    """
    stored = np.asarray(stored)
    assert stored.dtype == np.float16 and stored.shape == want.shape
    want = np.asarray(want, dtype=np.float32)
    step = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32)
    off = np.abs(stored.astype(np.float32) - want)
    assert (off <= step).all(), f"max off {off.max()} (float16 steps up to {step.max()})"
    # the rounding, not a different map: all but a few pixels are the rounded value itself
    # (0.2% measured with workers on 1 thread against a plain loop on 2)
    assert (stored != want.astype(np.float16)).mean() < 1e-2


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
    from shapcam.runtime.presets import PRESETS, resolve_preset

    options, step = resolve_preset("quick", ["rise", "gradcam", "scorecam"],
                                   {"rise": {"n_masks": 64}, "gradcam": {}})
    assert options == {"rise": {"n_masks": 64}, "scorecam": {"max_channels": 128}}
    assert step == PRESETS["quick"].causal_step == 1792
    assert resolve_preset("paper", ["rise"], {}) == ({}, 224)
    with pytest.raises(ShapCAMError, match="unknown preset 'fast'.*paper, quick"):
        resolve_preset("fast", ["rise"], {})


@pytest.mark.real_weights
def test_damage_is_found_and_repair_recomputes_exactly_those_shards(mobilenet, tmp_path):
    """A flipped byte in a Zarr chunk, a truncated Parquet file and a deleted completion
    record are each found with the shard to recompute; repairing recomputes those shards only,
    to the same results."""
    from datetime import UTC, datetime

    from typer.testing import CliRunner

    from flows.cli import app
    from storage.verify import mark_for_repair, verify_run
    from tasks.pipeline import write_run_manifest

    run_dir = tmp_path / "run"
    config = config_for(tmp_path / "data", n_images=6, shard_size=1)
    plan, _, _ = run_all(run_dir, config)
    write_run_manifest(str(run_dir), "run-test", config, plan, datetime.now(UTC))
    assert verify_run(run_dir).ok
    before = open_run(run_dir).metrics().sort_values(["method", "image_id"])
    records = run_dir / "shards" / "sample" / "mobilenet_v2"
    # shard 1: a flipped byte in its Shap-CAM raw map chunk (its maps derive from it)
    chunk = run_dir / "maps.zarr" / "sample" / "mobilenet_v2" / "shapcam" / "raw" / "c" / "1"
    chunk = next(p for p in chunk.rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    # shard 3: a truncated metrics file; shard 4: its completion record deleted
    metrics = next((run_dir / "metrics").rglob("method=gradcam/shard-00003-scorecam.parquet"))
    metrics.write_bytes(metrics.read_bytes()[:100])
    (records / "shard-00004.json").unlink()
    report = verify_run(run_dir)
    assert report.shards() == {("sample", "mobilenet_v2"): [1, 3, 4]}, report.problems
    whats = " | ".join(p.what for p in report.problems)
    assert "chunk 1 unreadable" in whats and "checksum mismatch" in whats
    assert "no completion record" in whats
    res = CliRunner().invoke(app, ["verify", str(run_dir)])
    assert res.exit_code == 1 and "DAMAGED [sample/mobilenet_v2 shard 1]" in res.output
    untouched = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")
                 if p.name in ("shard-00000.json", "shard-00002.json", "shard-00005.json")}
    assert mark_for_repair(run_dir, report) == [("sample", "mobilenet_v2", k) for k in (1, 3, 4)]
    _, again, _ = run_all(run_dir, config)
    assert [s["shard"] for s in again if not s["skipped"]] == [1, 1, 3, 3, 4, 4]
    assert {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")
            if p.name in untouched} == untouched
    write_run_manifest(str(run_dir), "run-test", config, plan, datetime.now(UTC))
    assert verify_run(run_dir).ok
    after = open_run(run_dir).metrics().sort_values(["method", "image_id"])
    assert after["avg_drop"].tolist() == pytest.approx(before["avg_drop"].tolist(), rel=1e-6)
    assert CliRunner().invoke(app, ["verify", str(run_dir)]).exit_code == 0


def test_builds_run_alone_and_computes_together():
    """torch.fx tracing patches nn.Module.__call__ process-wide: a build waits for running
    computes and holds new ones back (two shard tasks of one worker, their decoders)."""
    import threading
    import time

    from tasks.pipeline import BuildsAlone

    lock, events = BuildsAlone(), []
    with lock.compute(), lock.compute():  # computes share
        pass
    inside, release = threading.Event(), threading.Event()

    def compute(name: str) -> None:
        with lock.compute():
            events.append(f"{name} in")
            inside.set()
            release.wait(10)
            events.append(f"{name} out")

    def build() -> None:
        with lock.build(), lock.build():  # reentrant on its thread
            events.append("build")

    first = threading.Thread(target=compute, args=("a",))
    first.start()
    assert inside.wait(10)
    builder = threading.Thread(target=build)
    builder.start()
    time.sleep(0.3)
    inside.clear()
    late = threading.Thread(target=compute, args=("b",))  # arrives while the build waits
    late.start()
    time.sleep(0.3)
    assert events == ["a in"]  # the build waits for a; b waits for the build
    release.set()
    for t in (first, builder, late):
        t.join(10)
    assert events == ["a in", "a out", "build", "b in", "b out"]
