"""Hostile and careless input, round two: files from a user or a run folder run no code, run
ids never reach another run or outside the store, ``verify`` refuses what is not a run."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from shapcam.errors import ShapCAMError


class _Evil:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Evil(marker), "epoch": 0}, path)
    return path


def test_a_hostile_checkpoint_runs_no_code_through_any_entry_point(tmp_path):
    from shapcam.training.train import Checkpoint, load_checkpoint
    from tasks.config import DistillSpec
    from tasks.training import _teacher

    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(ShapCAMError, match="cannot read checkpoint .*evil.pth"):
        load_checkpoint(evil)
    with pytest.raises(ShapCAMError, match="cannot read checkpoint"):
        Checkpoint(evil).load()  # a student's or teacher's checkpoint when resuming
    run_dir = tmp_path / "run"  # a distill run whose teacher.pt was replaced
    _evil_checkpoint(run_dir / "checkpoints" / "teacher.pt", marker)
    with pytest.raises(ShapCAMError, match="cannot read checkpoint"):
        _teacher(str(run_dir), DistillSpec(dataset="digits"))
    res = CliRunner().invoke(app, ["distill", "--dataset", "digits", "--teacher-checkpoint",
                                   str(evil), "--store", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "cannot read checkpoint" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()
    assert not marker.exists()


def test_a_hostile_cifar_batch_runs_no_code(tmp_path):
    from test_distill import write_cifar

    from shapcam.training.cifar import load_cifar10

    write_cifar(tmp_path, n=4)
    marker = tmp_path / "pwned"
    with (tmp_path / "cifar-10-batches-py" / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(ShapCAMError, match="data_batch_2.*posix.system is not allowed"):
        load_cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["../x", "/abs", ".", "..", "a/b", "b?se", "r*", "[x]",
                                 "résumé", "a`b", "<img>", "a b", "", "-x", "x" * 101,
                                 "a..b"])
def test_invalid_run_ids_are_refused_before_any_path_is_built(bad):
    from storage import StorageError, check_run_id

    with pytest.raises(StorageError, match="invalid run id .*ASCII letters"):
        check_run_id(bad)


def test_valid_run_ids():
    from storage import check_run_id

    for good in ["sample-quick", "2026-12-03_ilsvrc.v2", "a", "X" * 100]:
        assert check_run_id(good) == good


@pytest.mark.parametrize("command", ["run", "distill"])
def test_the_cli_refuses_a_run_id_outside_the_store_in_one_line(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    extra = ["--dataset", "digits"] if command == "distill" else ["--methods", "gradcam"]
    for bad in ["../escaped", "résumé"]:
        res = CliRunner().invoke(app, [command, *extra, "--store", str(tmp_path / "runs"),
                                       "--run-id", bad])
        assert res.exit_code == 2 and "invalid run id" in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()


def test_a_run_folder_with_glob_characters_reads_and_repairs_only_itself(tmp_path):
    """Runs ``base`` and ``b?se`` side by side: queries, shard status and repair of ``b?se``
    never touch ``base`` (its name was a glob pattern that matched ``base``)."""
    import shutil

    from test_pipeline import config_for, run_all

    from storage import SaliencyStore, open_run
    from storage.verify import mark_for_repair, verify_run

    model = {"name": "timm:test_resnet", "weights": "random", "layer": None}
    config = config_for(tmp_path / "data", n_images=4, shard_size=2, models=[model],
                        methods=["gradcam"], method_options={})
    base, odd = tmp_path / "runs" / "base", tmp_path / "runs" / "b?se"
    run_all(base, config)
    shutil.copytree(base, odd)
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    for f in (odd / "metrics").rglob("shard-00001-*.parquet"):
        f.unlink()  # b?se: one shard's metrics gone
    (odd / "shards" / "sample" / "timm:test_resnet" / "shard-00001.json").unlink()
    assert len(open_run(odd).metrics()) == 2 and len(open_run(base).metrics()) == 4
    assert int(open_run(odd).sql("select count(*) as n from metrics")["n"][0]) == 2
    res = CliRunner().invoke(app, ["query", str(odd), "select count(*) as n from metrics"])
    assert res.exit_code == 0 and res.output.split()[-1] == "2", res.output
    assert SaliencyStore(odd).shard_status("sample", "timm:test_resnet") == {0: True, 1: False}
    chunk = next((odd / "maps.zarr" / "sample" / "timm:test_resnet" / "gradcam" / "raw")
                 .rglob("c/0/*/*"))
    chunk.write_bytes(b"\0" * chunk.stat().st_size)  # damage b?se's shard 0
    marked = mark_for_repair(str(odd), verify_run(str(odd)))
    assert ("sample", "timm:test_resnet", 0) in marked
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before


def test_prefect_keys_and_markdown_of_hostile_names_are_inert():
    from dashboards.render import code_span
    from flows.runtime import artifact_key

    assert artifact_key("report", "Run_1") != artifact_key("report", "run-1")
    assert artifact_key("report", "Run_1") == artifact_key("report", "Run_1")
    span = code_span("runs/x`<img src=x onerror=alert(1)>`")
    assert span.startswith("``") and span.endswith("``") and span.count("``") == 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small finished run (2 shards of 2 images, Grad-CAM and Shap-CAM), made once."""
    from test_pipeline import config_for, run_all

    root = tmp_path_factory.mktemp("finished")
    model = {"name": "timm:test_resnet", "weights": "random", "layer": None}
    config = config_for(root / "data", n_images=4, shard_size=2, models=[model],
                        method_options={"shapcam": {"permutations": 4}})
    run_all(root / "runs" / "r", config)
    return root / "runs" / "r", config


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "runs" / run.name))


def _verify(path: Path):
    return CliRunner().invoke(app, ["verify", str(path)])


def test_verify_refuses_what_is_not_a_run(tmp_path, finished_run):
    res = _verify(tmp_path / "nonexistent" / "x")
    assert res.exit_code == 2 and "does not exist" in res.output, res.output
    (tmp_path / "empty").mkdir()
    res = _verify(tmp_path / "empty")
    assert res.exit_code == 2 and "is not a run" in res.output, res.output
    _copy(finished_run[0], tmp_path)
    res = _verify(tmp_path / "runs")
    assert res.exit_code == 2 and "folder of runs" in res.output and "r" in res.output
    assert "no damage found" not in res.output + _verify(tmp_path / "empty").output


def test_verify_finds_a_missing_store_array_and_damaged_records(tmp_path, finished_run):
    import shutil

    from storage import StorageError
    from storage.verify import mark_for_repair, verify_run

    run = _copy(finished_run[0], tmp_path)
    assert _verify(run).exit_code == 0
    shutil.rmtree(run / "maps.zarr" / "sample" / "timm:test_resnet" / "shapcam" / "raw")
    shards = run / "shards" / "sample" / "timm:test_resnet"
    (shards / "shard-00000.json").write_text('{"shard": 0, "ima')  # truncated
    record = json.loads((shards / "shard-00001.json").read_text())
    record["images"] = 3  # one digit changed after writing
    (shards / "shard-00001.json").write_text(json.dumps(record))
    res = _verify(run)
    assert res.exit_code == 1, res.output
    assert "shapcam/raw: missing array" in res.output
    assert "shard 0] " in res.output and "not a readable record" in res.output
    assert "shard 1] " in res.output and "checksum mismatch" in res.output
    shutil.rmtree(run / "maps.zarr")
    report = verify_run(str(run))
    assert [p.what for p in report.problems if "maps.zarr" in p.path] == [
        "missing: the run's maps (maps.zarr) are gone"]
    with pytest.raises(StorageError, match="maps.zarr is missing.*new run id"):
        mark_for_repair(str(run), report)


def test_an_interrupted_table_creation_resumes_and_verifies(tmp_path, finished_run,
                                                           monkeypatch):
    """The table's layout is written last: a full disk just before it leaves a table without
    one, which verify reports (it crashed with KeyError) and a resume makes again (it refused:
    "exists with another layout None")."""
    import errno

    import storage.saliency
    from storage import SaliencyStore, StorageError
    from storage.verify import verify_run
    from tasks.pipeline import plan_run

    real = storage.saliency._spec_json

    def full_disk(spec):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.saliency, "_spec_json", full_disk)
    run = tmp_path / "runs" / "x"
    with pytest.raises(StorageError, match="disk is full"):
        plan_run(str(run), "x", finished_run[1])
    monkeypatch.setattr(storage.saliency, "_spec_json", real)
    report = verify_run(str(run))
    assert any("never finished" in p.what for p in report.problems), report.problems
    plan_run(str(run), "x", finished_run[1])  # the resume's first step
    spec, _ = SaliencyStore(run).table("sample", "timm:test_resnet")
    assert spec.n_images == 4 and verify_run(str(run)).problems  # shards still to compute


WIDE = "select repeat('x', 1000000) || i::varchar as s from range({n}) t(i)"


def test_wide_sql_results_stop_at_the_byte_budget(finished_run):
    from storage import StorageError, open_run

    run = open_run(finished_run[0])
    df = run.sql(WIDE.format(n=200), max_bytes=8 * 2**20)
    assert df.attrs["truncated"] and 1 <= len(df) <= 8  # ~1 MB each
    assert run.sql(WIDE.format(n=5), max_rows=2).attrs["truncated"]
    few = run.sql(WIDE.format(n=3))
    assert len(few) == 3 and not few.attrs["truncated"]
    with pytest.raises(StorageError, match="stopped after 0.5 s"):
        run.sql("select count(*) from range(1000000000000) a", timeout=0.5)
    assert run.sql("select current_setting('secret_directory') as d")["d"][0] == ""


def test_a_query_of_wide_values_stays_within_bounded_memory(finished_run):
    """The issue's attack: 1,200 values of 1 MB peaked at 5.8 GB (an uncaught ArrowMemoryError
    at 1,500 rows). Now DuckDB's 1 GB and the byte budget bound it (peak RSS of a process that
    runs only the query)."""
    import subprocess
    import sys

    code = ("import resource, sys; from storage import open_run, StorageError\n"
            "try:\n"
            f"    df = open_run(sys.argv[1]).sql({WIDE.format(n=1500)!r})\n"
            "    print('rows', len(df), df.attrs['truncated'])\n"
            "except StorageError as exc:\n"
            "    print('refused', exc)\n"
            "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code, str(finished_run[0])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused" in out.stdout and "memory" in out.stdout or \
        "True" in out.stdout, out.stdout
    peak_gb = int(out.stdout.split("peak")[-1]) / 2**20  # this process's own peak (KiB)
    assert peak_gb < 4.0, peak_gb  # measured 3.3 GB (DuckDB's 1 GB and the batches)


def test_a_query_stops_on_ctrl_c(finished_run, tmp_path):
    """Ctrl-C interrupts DuckDB (before: ignored until the query ended, here in hours)."""
    import signal
    import subprocess
    import sys

    # a terminal's process: SIGINT raises KeyboardInterrupt (a background job inherits it
    # ignored)
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from storage import open_run; run = open_run(sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "run.sql('select count(*) from range(1000000000000) a')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(finished_run[0])], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # into the query
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in out, out[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--methods", "shapcam", "--set", "shapcam.permutations=abc"],
     "permutations takes int, got 'abc'"),
    (["--methods", "gradcam,gradcam"], "--methods lists gradcam more than once"),
    (["--workers", "0"], "--workers"),
])
def test_careless_run_options_are_one_clear_error(tmp_path, args, message):
    res = CliRunner().invoke(app, ["run", "--store", str(tmp_path / "runs"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb's
    shape: nothing is decoded until the pixels are asked for)."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_every_image_opened_has_a_pixel_budget(tmp_path, finished_run):
    import pandas as pd
    from PIL import Image

    from shapcam.data.images import load_image
    from storage import StorageError, open_run

    bomb = _huge_png(tmp_path / "bomb.png", 12000, 12000)
    with pytest.raises(ShapCAMError, match="12000 x 12000 pixels, over the budget"):
        load_image(bomb)
    run = _copy(finished_run[0], tmp_path)
    index_file = run / "images-sample.parquet"
    index = pd.read_parquet(index_file)
    big = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 2000), (200, 30, 30)).save(big)
    index.loc[0, "path"], index.loc[1, "path"] = str(bomb), str(big)
    index.to_parquet(index_file)
    (run / "checksums" / "images-sample.parquet.json").unlink()
    handle = open_run(run)
    with pytest.raises(StorageError, match="over the budget"):
        handle.photo("sample", index.loc[0, "image_id"])
    photo = handle.photo("sample", index.loc[1, "image_id"])
    assert photo.shape == (683, 1024, 3)  # drawn at a bounded size, not 3000 x 2000


def test_file_names_are_data_not_templates():
    """An image id such as ``price_$1_$2`` was read as TeX by matplotlib (the report crashed
    after the manifest said completed)."""
    import numpy as np

    from dashboards.render import overlay_grid

    photo = np.zeros((8, 8, 3), np.uint8)
    png = overlay_grid([("price_$1_$2", photo)], {"gradcam": np.zeros((1, 8, 8))},
                       {"gradcam": "$\\frac{a}{"})
    assert png[:4] == b"\x89PNG"


def test_one_damaged_run_is_one_line_and_a_damaged_metrics_file_stops_the_report(
        tmp_path, finished_run):
    from dashboards.data import list_runs

    good, bad = _copy(finished_run[0], tmp_path), tmp_path / "runs" / "bad"
    import shutil

    shutil.copytree(good, bad)
    text = (bad / "maps.zarr" / "zarr.json").read_text()
    (bad / "maps.zarr" / "zarr.json").write_text(text[:100])  # truncated
    runs = {r.path: r for r in list_runs(tmp_path / "runs")}
    assert runs[str(bad)].status == "unreadable" and "zarr.json is damaged" in \
        runs[str(bad)].problem
    assert runs[str(good)].status != "unreadable"
    res = CliRunner().invoke(app, ["query", str(tmp_path / "runs")])
    assert res.exit_code == 0 and "unreadable" in res.output and "Traceback" not in res.output
    metrics = sorted((good / "metrics").rglob("*.parquet"))[0]
    metrics.write_bytes(metrics.read_bytes()[:300])  # truncated
    res = CliRunner().invoke(app, ["report", str(good)])
    assert res.exit_code == 2 and "metrics file" in res.output and "damaged" in res.output, \
        res.output


def test_a_full_disk_while_the_report_is_written_is_one_error_and_leaves_nothing(
        tmp_path, finished_run, monkeypatch):
    import errno

    import storage.location
    from storage import StorageError
    from tasks.pipeline import aggregate
    from tasks.reports import write_report

    run = _copy(finished_run[0], tmp_path)
    tables = aggregate(str(run), finished_run[1])

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.location.os, "replace", full)
    with pytest.raises(StorageError, match="disk is full"):
        write_report(str(run), finished_run[1], tables)
    assert not list(run.glob("report.html*"))  # no temporary file left


def test_the_manifest_says_completed_only_after_the_report():
    """The flow writes the report, then the manifest (a failed report left 'completed')."""
    import inspect

    from flows.explain_dataset import explain_dataset

    source = inspect.getsource(explain_dataset.fn)
    assert source.index("write_report(") < source.index("write_run_manifest(")


def test_one_writer_per_run_and_stale_locks_are_taken_over(tmp_path, monkeypatch):
    import signal
    import socket
    import subprocess
    import sys

    from storage.lock import RunLockedError, run_lock

    run = tmp_path / "runs" / "r"
    code = ("import sys, time; from storage.lock import run_lock\n"
            "with run_lock(sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"another process \\(pid {holder.pid} "), \
                run_lock(run):
            pass
        monkeypatch.chdir(tmp_path)
        res = CliRunner().invoke(app, ["run", "--methods", "gradcam", "--no-causal",
                                       "--store", str(tmp_path / "runs"), "--run-id", "r"])
        assert res.exit_code == 2 and f"pid {holder.pid}" in res.output, res.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(run), run_lock(run):  # its owner is gone: taken over; re-entrant
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()
    now = time.time()
    for heartbeat, refused in ((now, True), (now - 600, False)):  # another machine's lock
        (run / ".lock").write_text(json.dumps({"host": socket.gethostname() + "-other",
                                               "pid": 1, "heartbeat": heartbeat}))
        if refused:
            with pytest.raises(RunLockedError, match="-other"), run_lock(run):
                pass
        else:
            with run_lock(run):
                pass
