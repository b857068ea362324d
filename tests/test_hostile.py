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
    chunk = next((odd / "maps.zarr" / "sample" / "timm:test_resnet" / "gradcam" / "maps")
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
    import resource
    import subprocess
    import sys

    code = ("import sys; from storage import open_run, StorageError\n"
            "try:\n"
            f"    df = open_run(sys.argv[1]).sql({WIDE.format(n=1500)!r})\n"
            "    print('rows', len(df), df.attrs['truncated'])\n"
            "except StorageError as exc:\n"
            "    print('refused', exc)\n")
    out = subprocess.run([sys.executable, "-c", code, str(finished_run[0])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused" in out.stdout and "memory" in out.stdout or \
        "True" in out.stdout, out.stdout
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    assert peak_gb < 3.0, peak_gb


def test_a_query_stops_on_ctrl_c(finished_run, tmp_path):
    """Ctrl-C interrupts DuckDB (before: ignored until the query ended, here in hours)."""
    import signal
    import subprocess
    import sys

    code = ("import sys; from storage import open_run; run = open_run(sys.argv[1])\n"
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
