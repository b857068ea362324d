"""ILSVRC-sized runs: the consolidated metrics table, aggregate as one query, resume that submits
only incomplete shards, maps derived on read (small synthetic runs; benchmarks/bench_scale.py
measures the same code at 50,000 images)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shapcam.errors import ShapCAMError
from shapcam.evaluation.evaluate import MetricRow, summary_table
from storage import SaliencyStore, StorageError, open_run, write_metrics_shard
from storage.metrics_table import consolidate, consolidated_name
from storage.verify import mark_for_repair, verify_run
from tasks.config import ModelSpec, RunConfig

METHODS = ("gradcam", "shapcam", "rise")
MODELS = ("mobilenet_v2", "resnet50")
N, S = 12, 4


def metric_rows(model: str, method: str, shard: int, rng: np.random.Generator) -> list[dict]:
    """A shard's rows with every case aggregate must handle: failures, NaN and NULL values,
    no-box pointing statuses, a field metric computed for one model only."""
    rows = []
    for i in range(shard * S, min(N, (shard + 1) * S)):
        failed = rng.random() < 0.15
        row = {"run_id": "r", "image_id": f"img{i:02d}", "target": i % 5, "label": i % 5,
               "y": rng.random(), "o": rng.random(), "avg_drop": 100 * rng.random(),
               "increase": float(rng.random() < 0.5),
               "proportion": rng.random() if rng.random() < 0.6 else math.nan,
               "pointing": str(rng.choice(["scored", "no box", "filtered"])),
               "deletion": rng.random(), "insertion": None if rng.random() < 0.1 else
               rng.random(), "seconds": rng.random(), "evaluations": 0,
               "sparseness": rng.random() if model == "resnet50" else None,
               "road_morf": float(rng.random() < 0.3) if model == "resnet50" else math.nan,
               "error": f"{method}: broken" if failed else None}
        if failed:
            row.update({k: math.nan for k in ("avg_drop", "deletion", "proportion")})
        rows.append(row)
    return rows


def write_run(root, rng_seed: int = 0) -> dict[tuple[str, str, int], list[dict]]:
    SaliencyStore.create(root, "r")
    rng = np.random.default_rng(rng_seed)
    written = {}
    for model in MODELS:
        for method in METHODS:
            for k in range(math.ceil(N / S)):
                rows = metric_rows(model, method, k, rng)
                write_metrics_shard(root, "sample", model, method, k, rows)
                written[model, method, k] = rows
    return written


def config() -> RunConfig:
    return RunConfig(methods=METHODS, models=tuple(ModelSpec(m) for m in MODELS))


def as_metric_rows(rows: list[dict], method: str) -> list[MetricRow]:
    fields = set(MetricRow.__dataclass_fields__)
    out = []
    for r in rows:
        clean = {k: (math.nan if v is None else v) for k, v in r.items() if k in fields}
        out.append(MetricRow(**{**clean, "method": method, "protocol": "scorecam",
                                "error": r["error"]}))
    return out


def test_aggregate_query_equals_the_in_memory_summary_table(tmp_path):
    from tasks.summary import aggregate

    written = write_run(tmp_path)
    tables = aggregate(str(tmp_path), config())
    for model in MODELS:
        rows = [r for (m, method, _), rs in written.items() if m == model
                for r in as_metric_rows(rs, method)]
        want = summary_table(rows, METHODS)
        got = tables[model]
        assert [r["metric"] for r in got["rows"]] == [r["metric"] for r in want["rows"]]
        assert any("Sparseness" in r["metric"] for r in got["rows"]) == (model == "resnet50")
        for g, w in zip(got["rows"], want["rows"], strict=True):
            assert g["values"] == pytest.approx(w["values"], rel=1e-12, nan_ok=True), g["metric"]
        for key in ("images", "explanations", "failed", "proportion_images",
                    "pointing_no_box"):
            assert got[key] == want[key], key
        assert got["seconds_per_image"] == pytest.approx(want["seconds_per_image"], rel=1e-12)
    summary = open_run(tmp_path).summary("scorecam")
    assert set(summary["model"]) == set(MODELS) and (summary["run_id"] == "r").all()


def test_the_consolidated_table_is_rebuilt_after_a_repair_and_queries_see_the_new_rows(tmp_path):
    from tasks.summary import aggregate

    write_run(tmp_path)
    aggregate(str(tmp_path), config())
    run = open_run(tmp_path)
    path = tmp_path / consolidated_name("scorecam")
    assert path.exists() and verify_run(tmp_path).ok
    n = run.sql("select count(*) as n from metrics")["n"][0]
    assert n == len(MODELS) * len(METHODS) * N
    # a shard's file damaged by hand: verify names it, repair marks it and drops the table
    shard_file = (tmp_path / "metrics" / "dataset=sample" / "model=resnet50" / "method=rise" /
                  "shard-00001-scorecam.parquet")
    shard_file.write_bytes(shard_file.read_bytes()[:200])
    report = verify_run(tmp_path)
    assert ("sample", "resnet50") in report.shards()
    mark_for_repair(tmp_path, report)
    assert not path.exists()
    # the resumed shard writes new rows (avg_drop 0), then the run's end rebuilds the table
    for method in METHODS:  # repair marked the shard: every method's file of it
        rows = metric_rows("resnet50", method, 1, np.random.default_rng(9))
        write_metrics_shard(tmp_path, "sample", "resnet50", method, 1,
                            [{**r, "avg_drop": 0.0, "error": None} for r in rows])
    assert not path.exists()  # a reader now scans the shard files
    assert run.sql("select count(*) as n from metrics")["n"][0] == n
    aggregate(str(tmp_path), config())
    assert path.exists() and verify_run(tmp_path).ok
    got = run.sql("select avg_drop from metrics where model = 'resnet50' and method = 'rise' "
                  "and shard = 1")
    assert len(got) == S and (got["avg_drop"] == 0).all()


def test_a_writer_invalidates_the_consolidated_table_and_verify_finds_a_stale_one(tmp_path):
    write_run(tmp_path)
    consolidate(tmp_path, "scorecam")
    path = tmp_path / consolidated_name("scorecam")
    kept = path.read_bytes()
    write_metrics_shard(tmp_path, "sample", "resnet50", "rise", 0,
                        metric_rows("resnet50", "rise", 0, np.random.default_rng(1)))
    assert not path.exists()  # the writer removed it before writing its shard
    # an old table put back by hand (or a writer that predates invalidation): stale, found
    path.write_bytes(kept)
    checksum = tmp_path / "checksums" / (consolidated_name("scorecam") + ".json")
    from storage.tables import file_checksum

    checksum.write_text(json.dumps(file_checksum(kept)))
    extra = metric_rows("resnet50", "rise", 2, np.random.default_rng(2))
    (tmp_path / "metrics" / "dataset=sample" / "model=resnet50" / "method=rise" /
     "shard-00002-scorecam.parquet").unlink()
    report = verify_run(tmp_path)
    assert [p.what for p in report.problems if "stale" in p.what], report.problems
    # readers do not trust a table whose source count differs: they scan the shard files
    n = open_run(tmp_path).sql("select count(*) as n from metrics")["n"][0]
    assert n == len(MODELS) * len(METHODS) * N - len(extra)


def test_one_sandbox_serves_many_read_only_queries(tmp_path):
    write_run(tmp_path)
    consolidate(tmp_path, "scorecam")
    box = open_run(tmp_path).sandbox()
    try:
        n = box.query("select count(*) as n from metrics")["n"][0]
        for attack in ("drop table metrics", "delete from metrics",
                       "select 1; drop table metrics", "create table x as select 1",
                       "insert into metrics select * from metrics", "pragma show_tables",
                       "set memory_limit = '10GB'", "attach ':memory:' as y",
                       "call pragma_version()"):
            with pytest.raises(StorageError, match="refused|failed"):
                box.query(attack)
        assert box.query("select count(*) as n from metrics")["n"][0] == n
        assert box.query("describe metrics")["column_name"].tolist()[:3] == [
            "run_id", "shard", "image_id"]
        with pytest.raises(StorageError, match="Permission|refused|disabled"):
            box.query("select * from read_csv('/etc/passwd')")
    finally:
        box.close()


def test_queries_read_the_consolidated_table_not_the_shard_files(tmp_path, monkeypatch):
    write_run(tmp_path)
    consolidate(tmp_path, "scorecam")
    import storage.metrics_table as mt

    opened = []
    real = mt.shard_dataset
    monkeypatch.setattr(mt, "shard_dataset", lambda *a, **k: opened.append(a) or real(*a, **k))
    df = open_run(tmp_path).metrics(filters=[("model", "=", "resnet50")])
    assert not opened and len(df) == len(METHODS) * N
    assert isinstance(df, pd.DataFrame) and set(df["method"]) == set(METHODS)


def _sample_config(tmp_path, **extra) -> RunConfig:
    return RunConfig.from_dict({"dataset": "sample", "root": str(tmp_path / "data"),
                                "n_images": 5, "shard_size": 2, "methods": ["gradcam"],
                                "causal": False, **extra})


@pytest.mark.real_weights
def test_complete_shards_is_what_the_flow_submits_no_more(tmp_path):
    from tasks.pipeline import complete_shards, evaluate_shard, explain_shard, plan_run

    config = _sample_config(tmp_path)
    run_dir = str(tmp_path / "run")
    plan = plan_run(run_dir, "r", config)
    model = config.models[0]
    assert len(plan["shards"]) == 3 and complete_shards(run_dir, config, 3) == set()
    explain_shard(run_dir, config, model, 0, plan["shards"][0])
    explain_shard(run_dir, config, model, 1, plan["shards"][1])
    evaluate_shard(run_dir, config, model, 1, plan["shards"][1])
    # shard 0: maps, no metrics; shard 1: both; shard 2: nothing
    assert complete_shards(run_dir, config, 3) == {(model.name, 1)}
    other = config.replace(protocol="gradcampp")  # another variant: nothing evaluated yet
    assert complete_shards(run_dir, other, 3, explain=False) == set()
    evaluate_shard(run_dir, other, model, 0, plan["shards"][0])
    assert complete_shards(run_dir, other, 3, explain=False) == {(model.name, 0)}


@pytest.mark.real_weights
def test_a_resume_reads_its_image_index_not_the_dataset(tmp_path, monkeypatch):
    import tasks.plan
    from shapcam.data import open_dataset as real
    from tasks.pipeline import plan_run

    config = _sample_config(tmp_path)
    run_dir = str(tmp_path / "run")
    first = plan_run(run_dir, "r", config)

    def no_dataset(*_a, **_k):
        raise AssertionError("the dataset was read again")

    monkeypatch.setattr(tasks.plan, "open_dataset", no_dataset)
    again = plan_run(run_dir, "r", config)
    assert again == first  # the same shards, records and all (boxes, sizes, labels)
    with pytest.raises(ShapCAMError, match="n_images=5"):  # other options: still refused
        plan_run(run_dir, "r", config.replace(n_images=4))
    monkeypatch.undo()
    # the dataset's folder changed (a file that is no image added): read anew, same draw
    photo = Path(first["shards"][0][0]["path"])
    (photo.parent / "notes.txt").write_text("not an image")
    calls: list = []
    monkeypatch.setattr(tasks.plan, "open_dataset",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    assert plan_run(run_dir, "r", config)["shards"] == first["shards"] and len(calls) == 1
    # ... a draw of other images (an image added changes the sample of 5) is explained,
    # never mixed into the run
    (photo.parent / "zz_extra.JPEG").write_bytes(photo.read_bytes())
    with pytest.raises(ShapCAMError, match="now gives other images.*new: .'zz_extra'"):
        plan_run(run_dir, "r", config)


def test_the_automatic_shard_size_keeps_the_task_count_bounded():
    from tasks.plan import TARGET_SHARDS, auto_shard_size

    assert auto_shard_size(6) == 8 and auto_shard_size(4000) == 8
    assert auto_shard_size(4001) == 16 and auto_shard_size(50_000) == 128
    assert auto_shard_size(10**7) == 128  # the unit of resume stays small
    for n in (1, 999, 4952, 50_000, 64_000):
        assert math.ceil(n / auto_shard_size(n)) <= TARGET_SHARDS


@pytest.mark.parametrize("shape", [(7, 7), (14, 14), (28, 28), (9, 12), (224, 224)])
def test_maps_derived_in_numpy_are_the_methods_maps_bit_for_bit(shape):
    import torch
    import torch.nn.functional as F

    from shapcam.methods.base import minmax, upsample_normalise
    from storage.derive import maps_from_raw

    raw = np.random.default_rng(len(shape) + shape[0]).standard_normal((16, *shape))
    raw = raw.astype(np.float32)
    raw[3] = 0.0  # a constant map: all zeros
    ours = upsample_normalise(torch.from_numpy(raw), (224, 224))
    np.testing.assert_array_equal(maps_from_raw(raw, (224, 224)), ours.half().numpy())
    # and the methods' maps are still PyTorch's bilinear upsampling, to float32 rounding
    ref = minmax(F.interpolate(torch.from_numpy(raw).clamp_min(0)[:, None], size=(224, 224),
                               mode="bilinear", align_corners=False)[:, 0])
    assert float((ours - ref).abs().max()) < 2e-6
    missing = np.full((2, *shape), np.nan, dtype=np.float32)  # a failed image stays NaN
    assert np.isnan(maps_from_raw(missing, (224, 224))).all()


@pytest.mark.real_weights
def test_maps_derived_on_read_equal_the_maps_a_full_store_keeps(tmp_path, monkeypatch):
    """The same shard written in the compact layout (CAM maps derived from raw maps, RISE's
    raw map in float16) and in the full one (every map stored): ``Run.maps``, ``read_shard``
    and the metrics are the same; the compact store is smaller."""
    import tasks.plan
    from storage import TableSpec
    from tasks.pipeline import process_shard

    def full(n, s, shape, raw_shapes, **kw):  # the layout before: every map stored
        return TableSpec(n, s, shape, raw_shapes, **kw)

    config = _sample_config(tmp_path, methods=["gradcam", "shapcam", "rise"], n_images=3,
                            shard_size=3, target="topk:2",
                            method_options={"shapcam": {"permutations": 8},
                                            "rise": {"n_masks": 64}})
    out = {}
    for layout in ("compact", "full"):
        if layout == "full":
            monkeypatch.setattr(tasks.plan.TableSpec, "compact", staticmethod(full))
        run_dir = str(tmp_path / layout)
        plan = tasks.plan.plan_run(run_dir, layout, config)
        process_shard(run_dir, config, config.models[0], 0, plan["shards"][0])
        out[layout] = open_run(run_dir)
    compact, stored = out["compact"], out["full"]
    spec = compact.store.table("sample", "mobilenet_v2")[0]
    assert spec.derived == ("gradcam", "shapcam") and spec.half_raw == ("rise",)
    for method in config.methods:
        a = compact.maps("sample", "mobilenet_v2", method).values
        b = stored.maps("sample", "mobilenet_v2", method).values
        assert a.shape == b.shape == (3, 2, 224, 224) and a.dtype == np.float16
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(
            compact.store.read_shard("sample", "mobilenet_v2", method, 0), b)
    raw = compact.maps("sample", "mobilenet_v2", "rise", variable="raw").values
    ref = stored.maps("sample", "mobilenet_v2", "rise", variable="raw").values
    assert raw.dtype == np.float16
    np.testing.assert_allclose(raw.astype(np.float32), ref, rtol=1e-3)
    cols = ["method", "image_id", "target", "avg_drop", "increase", "proportion"]
    ma = compact.metrics(columns=cols).sort_values(cols[:3]).reset_index(drop=True)
    mb = stored.metrics(columns=cols).sort_values(cols[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(ma, mb)

    def size(root):
        return sum(p.stat().st_size for p in (root / "maps.zarr").rglob("*") if p.is_file())

    assert size(tmp_path / "compact") < 0.6 * size(tmp_path / "full")
