"""The saliency store and tables: write, read, resume, concurrency, corruption, queries."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import storage
from storage import (
    IncompleteShardError,
    SaliencyStore,
    SchemaVersionError,
    StorageError,
    TableSpec,
    open_run,
    write_manifest,
    write_metrics_shard,
    write_summary,
)

N, S = 10, 4
SPEC = TableSpec(N, S, (16, 16), {"shapcam": (4, 4), "gradcam": (4, 4)})
IDS = [f"img{i:02d}" for i in range(N)]
LABELS = [i % 3 for i in range(N)]
REPO = Path(__file__).resolve().parents[1]


def shard_arrays(shard: int, seed: int = 0):
    lo, hi = shard * S, min(N, (shard + 1) * S)
    n = hi - lo
    rng = np.random.default_rng(seed + shard)
    images = {"target": np.arange(lo, hi), "probability": rng.random(n),
              "width": np.full(n, 640), "height": np.full(n, 480),
              "boxes": rng.random((n, 2, 4)) * 100}
    methods = {m: {"maps": rng.random((n, 16, 16)), "raw": rng.standard_normal((n, 4, 4))}
               for m in ("shapcam", "gradcam")}
    methods["shapcam"]["stderr"] = rng.random((n, 4, 4))
    return images, methods


def make_store(root: Path, shards=(0, 1, 2)) -> SaliencyStore:
    st = SaliencyStore.create(root, "run-1", {"config": {"k": 512}, "versions": {"zarr": "3"}})
    st.init_table("sample", "mobilenet_v2", IDS, LABELS, SPEC, {"weights_sha256": "abc"})
    for k in shards:
        st.write_shard("sample", "mobilenet_v2", k, *shard_arrays(k), record={"seconds": 1.0})
    return st


def test_round_trip_and_layout_readable_with_plain_zarr(tmp_path):
    import zarr

    make_store(tmp_path)
    g = zarr.open_group(tmp_path / "maps.zarr", mode="r")
    assert g.attrs["schema_version"] == storage.SCHEMA_VERSION and g.attrs["run_id"] == "run-1"
    maps = g["sample/mobilenet_v2/shapcam/maps"]
    assert maps.dtype == np.float16 and maps.chunks == (S, 16, 16)
    assert g["sample/mobilenet_v2/images/image_id"][:].tolist() == IDS
    images, methods = shard_arrays(1)
    np.testing.assert_allclose(maps[4:8], methods["shapcam"]["maps"], atol=1e-3)
    np.testing.assert_array_equal(g["sample/mobilenet_v2/shapcam/raw"][4:8],
                                  methods["shapcam"]["raw"].astype(np.float32))
    boxes = g["sample/mobilenet_v2/images/boxes"][4:8]
    np.testing.assert_allclose(boxes[:, :2], images["boxes"], rtol=1e-6)
    assert np.isnan(boxes[:, 2:]).all()  # padding


def test_lazy_selection_by_id_and_label(tmp_path):
    make_store(tmp_path)
    run = open_run(tmp_path)
    da = run.maps("sample", "mobilenet_v2", "shapcam", labels=[1])
    assert da.dims == ("image", "y", "x")
    assert da.coords["image"].values.tolist() == [i for i, lab in zip(IDS, LABELS,
                                                                      strict=True) if lab == 1]
    assert hasattr(da.data, "dask")  # lazy until loaded
    by_id = run.maps("sample", "mobilenet_v2", "shapcam", ids=["img05", "img09"]).load()
    _, methods = shard_arrays(1)
    np.testing.assert_allclose(by_id.values[0], methods["shapcam"]["maps"][1], atol=1e-3)
    with pytest.raises(StorageError, match="unknown image ids"):
        run.maps("sample", "mobilenet_v2", "shapcam", ids=["nope"])


def test_incomplete_shard_is_an_error_not_zeros(tmp_path):
    st = make_store(tmp_path, shards=(0, 2))
    assert st.shard_status("sample", "mobilenet_v2") == {0: True, 1: False, 2: True}
    with pytest.raises(IncompleteShardError, match="shard 1 .* never completed"):
        st.read_shard("sample", "mobilenet_v2", "shapcam", 1)
    with pytest.raises(IncompleteShardError, match=r"shards \[1\]"):
        open_run(tmp_path).maps("sample", "mobilenet_v2", "shapcam")
    ok = open_run(tmp_path).maps("sample", "mobilenet_v2", "shapcam", ids=["img00"])
    assert ok.shape == (1, 16, 16)


def test_writing_a_shard_twice_is_idempotent(tmp_path):
    st = make_store(tmp_path)
    before = st.read_shard("sample", "mobilenet_v2", "gradcam", 2)
    st.write_shard("sample", "mobilenet_v2", 2, *shard_arrays(2))
    np.testing.assert_array_equal(st.read_shard("sample", "mobilenet_v2", "gradcam", 2), before)
    # init_table again with the same spec is a no-op; with another spec an error
    st.init_table("sample", "mobilenet_v2", IDS, LABELS, SPEC)
    other = TableSpec(N, 5, (16, 16), {"shapcam": (4, 4)})
    with pytest.raises(StorageError, match="exists with another layout"):
        st.init_table("sample", "mobilenet_v2", IDS, LABELS, other)


def test_bad_shapes_and_names_are_clear_errors(tmp_path):
    st = make_store(tmp_path, shards=())
    images, methods = shard_arrays(0)
    methods["shapcam"]["maps"] = methods["shapcam"]["maps"][:, :8]
    with pytest.raises(StorageError, match=r"shapcam.maps has shape \(4, 8, 16\), the shard "
                                           r"needs \(4, 16, 16\)"):
        st.write_shard("sample", "mobilenet_v2", 0, images, methods)
    with pytest.raises(StorageError, match="shard 7 does not exist"):
        st.write_shard("sample", "mobilenet_v2", 7, *shard_arrays(0))
    with pytest.raises(StorageError, match="no table sample/resnet18"):
        st.table("sample", "resnet18")
    with pytest.raises(StorageError, match="belongs to run 'run-1'"):
        SaliencyStore.create(tmp_path, "run-2")


@pytest.mark.parametrize("version, hint", [(3, "upgrade shapcam"), (0, "re-run it")])
def test_other_schema_versions_are_refused(tmp_path, version, hint):
    make_store(tmp_path, shards=(0,))
    meta = tmp_path / "maps.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = version
    doc.pop("consolidated_metadata", None)
    meta.write_text(json.dumps(doc))
    with pytest.raises(SchemaVersionError, match=f"schema version {version}.*{hint}"):
        open_run(tmp_path).tables()


def test_full_disk_surfaces_clearly_and_keeps_written_shards(tmp_path, monkeypatch):
    st = make_store(tmp_path, shards=(0,))
    import zarr

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", no_space)
    with pytest.raises(StorageError, match="the disk is full"):
        st.write_shard("sample", "mobilenet_v2", 1, *shard_arrays(1))
    monkeypatch.undo()
    assert st.shard_status("sample", "mobilenet_v2") == {0: True, 1: False, 2: False}
    assert st.read_shard("sample", "mobilenet_v2", "shapcam", 0).shape == (4, 16, 16)


def test_permission_error_is_clear(tmp_path, monkeypatch):
    from storage.location import Location

    st = make_store(tmp_path, shards=())

    def denied(self, data, *parts):
        raise PermissionError(errno.EACCES, "Permission denied", "/".join(parts))

    monkeypatch.setattr(Location, "write_bytes", denied)
    with pytest.raises(StorageError, match="no permission to write there"):
        st.write_shard("sample", "mobilenet_v2", 0, *shard_arrays(0))


WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {tests!r})
    from test_storage import shard_arrays
    from storage import SaliencyStore
    import zarr
    st = SaliencyStore({root!r})
    shards = [int(s) for s in sys.argv[1].split(",")]
    slow = len(sys.argv) > 2
    if slow:  # make every chunk write slow so the parent can kill us mid-shard
        original = zarr.Array.__setitem__
        def slow_set(self, key, value):
            original(self, key, value)
            print("wrote", self.path, flush=True)
            time.sleep(0.5)
        zarr.Array.__setitem__ = slow_set
    for k in shards:
        st.write_shard("sample", "mobilenet_v2", k, *shard_arrays(k))
    print("done", flush=True)
""")


def _writer(tmp_path: Path, shards: str, *extra: str) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(REPO / "tests"), root=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), shards, *extra],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_writer_killed_mid_shard_can_be_resumed(tmp_path):
    make_store(tmp_path, shards=(0,))
    proc = _writer(tmp_path, "1", "slow")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if len(lines) == 3:  # some chunks of shard 1 written, not all
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    st = SaliencyStore(tmp_path)
    assert st.shard_status("sample", "mobilenet_v2") == {0: True, 1: False, 2: False}
    with pytest.raises(IncompleteShardError):
        st.read_shard("sample", "mobilenet_v2", "shapcam", 1)
    assert st.read_shard("sample", "mobilenet_v2", "shapcam", 0).shape == (4, 16, 16)
    # resume: the same shard written again completes it with the right data
    st.write_shard("sample", "mobilenet_v2", 1, *shard_arrays(1))
    _, methods = shard_arrays(1)
    np.testing.assert_allclose(st.read_shard("sample", "mobilenet_v2", "gradcam", 1),
                               methods["gradcam"]["maps"], atol=1e-3)


def test_concurrent_writer_processes_own_their_chunks(tmp_path):
    make_store(tmp_path, shards=())
    procs = [_writer(tmp_path, "0,2"), _writer(tmp_path, "1")]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "done" in out
    st = SaliencyStore(tmp_path)
    assert all(st.shard_status("sample", "mobilenet_v2").values())
    for k in range(3):
        _, methods = shard_arrays(k)
        np.testing.assert_allclose(st.read_shard("sample", "mobilenet_v2", "shapcam", k),
                                   methods["shapcam"]["maps"], atol=1e-3)


def metric_rows(shard: int, method: str):
    lo, hi = shard * S, min(N, (shard + 1) * S)
    return [{"run_id": "run-1", "image_id": IDS[i], "target": i, "label": LABELS[i],
             "protocol": "scorecam", "avg_drop": float(10 * i + (method == "gradcam")),
             "increase": float(i % 2), "seconds": 0.1, "evaluations": 100,
             "error": None if i != 3 else "corrupt JPEG"} for i in range(lo, hi)]


def write_tables(root: Path) -> None:
    for method in ("shapcam", "gradcam"):
        for k in range(3):
            write_metrics_shard(root, "sample", "mobilenet_v2", method, k, metric_rows(k, method))
    write_manifest(root, [{"run_id": "run-1", "config_hash": "h", "status": "completed",
                           "dataset": "sample", "model": "mobilenet_v2", "shards_total": 3,
                           "shards_done": 3, "images": N, "failed_images": 1, "seconds": 12.5}])
    write_summary(root, [{"run_id": "run-1", "dataset": "sample", "model": "mobilenet_v2",
                          "method": "shapcam", "protocol": "scorecam", "metric": "avg_drop",
                          "value": 45.0, "images": 9}])


def test_metrics_tables_partitioned_atomic_and_queryable(tmp_path):
    make_store(tmp_path)
    write_tables(tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet"))
    assert ("metrics/dataset=sample/model=mobilenet_v2/method=shapcam/shard-00002-scorecam"
            ".parquet") in files
    assert not list(tmp_path.rglob("*.tmp*"))
    run = open_run(tmp_path)
    df = run.metrics(filters=[("method", "=", "gradcam"), ("avg_drop", ">", 50)])
    assert sorted(df["image_id"]) == ["img05", "img06", "img07", "img08", "img09"]
    assert set(df["method"]) == {"gradcam"} and set(df["dataset"]) == {"sample"}
    out = run.sql("select method, avg(avg_drop) as d, count(error) as failed from metrics "
                  "group by method order by method")
    assert out["method"].tolist() == ["gradcam", "shapcam"]
    assert out["d"].tolist() == [46.0, 45.0] and out["failed"].tolist() == [1, 1]
    assert run.sql("select status from manifest")["status"].tolist() == ["completed"]
    assert run.sql("select value from summary")["value"].tolist() == [45.0]


def test_rewriting_a_metrics_shard_replaces_it(tmp_path):
    write_metrics_shard(tmp_path, "d", "m", "x", 0, metric_rows(0, "x"))
    write_metrics_shard(tmp_path, "d", "m", "x", 0, metric_rows(0, "x")[:2])
    assert len(open_run(tmp_path).metrics()) == 2
    with pytest.raises(StorageError, match="unknown columns"):
        write_metrics_shard(tmp_path, "d", "m", "x", 1, [{"image_id": "a", "bogus": 1}])
    with pytest.raises(StorageError, match="do not fit the schema"):
        write_metrics_shard(tmp_path, "d", "m", "x", 1, [{"image_id": "a", "avg_drop": "high"}])


def test_query_cli(tmp_path):
    from flows.cli import app

    make_store(tmp_path)
    write_tables(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["query", str(tmp_path), "select method, count(*) as n from "
                              "metrics group by method order by method", "--csv",
                              str(tmp_path / "out.csv")])
    assert res.exit_code == 0, res.output
    assert "gradcam" in res.output and "shapcam" in res.output
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "method,n"
    res = runner.invoke(app, ["query", str(tmp_path), "select nope from metrics"])
    assert res.exit_code == 2 and "query failed" in res.output
    res = runner.invoke(app, ["query", str(tmp_path / "missing"), "select 1"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["query", str(tmp_path)])  # no SQL: the tables
    assert res.exit_code == 0 and "metrics" in res.output and "manifest" in res.output


def test_query_on_a_folder_of_runs_lists_them(tmp_path):
    from flows.cli import app

    for name in ("run-a", "run-b"):
        make_store(tmp_path / name)
        write_tables(tmp_path / name)
    (tmp_path / "not-a-run").mkdir()
    runner = CliRunner()
    res = runner.invoke(app, ["query", str(tmp_path)])
    assert res.exit_code == 0, res.output
    listed = [line.split()[0] for line in res.output.splitlines()[2:]]
    assert sorted(listed) == ["run-a", "run-b"] and "completed" in res.output
    res = runner.invoke(app, ["query", str(tmp_path), "select * from metrics"])
    assert res.exit_code == 2 and "folder of runs" in res.output and "run-b" in res.output
    assert "Traceback" not in res.output and "Parser Error" not in res.output
    with pytest.raises(StorageError, match="folder of runs, not a run"):
        open_run(tmp_path)


def test_library_layers_import_no_upper_layer():
    """storage needs neither torch nor the command/orchestration stack; shapcam not the latter."""
    for imports, banned in (("storage, storage.query", ("torch", "prefect", "typer")),
                            ("shapcam, shapcam.data, shapcam.training.distillation",
                             ("prefect", "typer", "dask", "zarr"))):
        code = (f"import sys, {imports}; "
                f"bad = [m for m in {banned!r} if m in sys.modules]; print(bad)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
        assert out.stdout.strip() == "[]", (imports, out.stdout, out.stderr)


def test_missing_store_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="not a saliency store"):
        open_run(tmp_path / "empty").tables()


def test_store_and_tables_on_an_fsspec_url():
    """The same API on a non-local filesystem (fsspec's in-memory one stands for S3/GCS)."""
    import fsspec

    url = "memory://shapcam-test/run-url"
    fsspec.filesystem("memory").rm("/shapcam-test", recursive=True) if fsspec.filesystem(
        "memory").exists("/shapcam-test") else None
    st = make_store(url, shards=(0, 1))
    assert st.shard_status("sample", "mobilenet_v2") == {0: True, 1: True, 2: False}
    write_tables(url)
    run = open_run(url)
    _, methods = shard_arrays(1)
    got = run.maps("sample", "mobilenet_v2", "shapcam", ids=["img05"]).values[0]
    np.testing.assert_allclose(got, methods["shapcam"]["maps"][1], atol=1e-3)
    with pytest.raises(IncompleteShardError):
        st.read_shard("sample", "mobilenet_v2", "shapcam", 2)
    assert len(run.metrics(filters=[("method", "=", "gradcam")])) == N
    out = run.sql("select method, count(*) as n from metrics group by method order by method")
    assert out["n"].tolist() == [N, N]
    assert run.sql("select status from manifest")["status"].tolist() == ["completed"]
    assert run.sql("select count(*) as n from summary")["n"].tolist() == [1]


def test_sql_sandbox_refuses_every_hostile_query(tmp_path):
    """Files, URLs, extensions and settings are shut by DuckDB's own settings: each hostile
    query fails with one line, reads nothing outside the run and writes nothing anywhere,
    while the documented queries work."""
    from sql_attacks import EXAMPLES, SECRET, attacks

    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_text(f"token\n{SECRET}\n")
    make_store(run_dir)
    write_tables(run_dir)
    before = sorted(p for p in tmp_path.rglob("*"))
    run = open_run(run_dir)
    queries = attacks(run_dir, secret, outside)
    assert len(queries) >= 15
    for query in queries:
        with pytest.raises(StorageError) as info:
            run.sql(query)
        message = str(info.value)
        assert "\n" not in message and SECRET not in message, query
        assert "refused" in message or "failed" in message, query
    assert sorted(p for p in tmp_path.rglob("*")) == before, "a query wrote a file"
    for query in EXAMPLES:
        assert len(run.sql(query)) >= 1, query
    assert run.sql("select 1 as x from range(5)", max_rows=3).attrs["truncated"]
    with pytest.raises(StorageError, match="stopped after 0.2 s"):
        run.sql("select count(*) from range(1000000000) a, range(1000) b "
                "where a.range % 7 = b.range", timeout=0.2)
