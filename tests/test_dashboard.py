"""The dashboard's data layer on a real run (the pipeline's tasks on the sample photos), and the
dashboard itself in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from dashboards import data
from storage import Run, StorageError, open_run
from tasks.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_weights


def _config(root: Path) -> RunConfig:
    return RunConfig.from_dict({
            "dataset": "sample", "root": str(root), "n_images": None, "seed": 0,
            "shard_size": 3, "models": [{"name": "mobilenet_v2", "weights": "IMAGENET1K_V1",
                                         "layer": None}],
            "methods": ["gradcam", "shapcam"], "method_options": {"shapcam":
                                                                   {"permutations": 8}},
            "protocol": "scorecam", "causal": True, "causal_step": 224 * 56, "preset": "test",
            "device": "cpu"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> Path:
    """A runs folder with one completed run (maps, metrics, manifest) and one in progress."""
    request.getfixturevalue("mobilenet")
    from tasks.pipeline import explain_shard, plan_run, write_run_manifest

    base = tmp_path_factory.mktemp("dash")
    config = _config(base / "data")
    run_dir = str(base / "runs" / "done")
    plan = _complete_run(run_dir, "done", config)
    write_run_manifest(run_dir, "done", config, plan, datetime.now(UTC))
    busy = str(base / "runs" / "busy")
    plan = plan_run(busy, "busy", config)
    explain_shard(busy, config, config.models[0], 0, plan["shards"][0])
    return base / "runs"


def _complete_run(run_dir: str, run_id: str, config: RunConfig) -> dict:
    """Plan, explain, evaluate and aggregate every shard of a run (the pipeline's tasks)."""
    from tasks.pipeline import aggregate, evaluate_shard, explain_shard, plan_run

    plan = plan_run(run_dir, run_id, config)
    for k, records in enumerate(plan["shards"]):
        explain_shard(run_dir, config, config.models[0], k, records)
        evaluate_shard(run_dir, config, config.models[0], k, records)
    aggregate(run_dir, config)
    return plan


def test_run_list_statuses_and_problems(runs, tmp_path):
    listed = {r.run_id: r for r in data.list_runs(runs)}
    assert set(listed) == {"done", "busy"}
    done, busy = listed["done"], listed["busy"]
    assert (done.status, done.images, done.dataset, done.methods, done.problem) == (
        "completed", 6, "sample", "gradcam, shapcam", None)
    assert busy.status == "in progress" and "1 of 2 shards done" in busy.problem
    frame = data.runs_frame(list(listed.values()))
    assert list(frame.columns) == ["run_id", "dataset", "models", "methods", "images", "status",
                                   "created", "preset"]
    # A store from a newer schema version is listed as unreadable, with the reason.
    shutil.copytree(runs / "done", tmp_path / "future")
    meta = tmp_path / "future" / "maps.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = 99
    meta.write_text(json.dumps(doc))
    (future,) = data.list_runs(tmp_path)
    assert future.status == "unreadable" and "99" in future.problem
    assert data.list_runs(tmp_path / "future" / "metrics") == []  # a folder with no runs
    with pytest.raises(StorageError, match="does not exist"):
        data.list_runs(tmp_path / "nowhere")


def test_paper_table_is_the_stored_summary(runs):
    run = Run(runs / "done")
    table = data.paper_table(run, "sample", "mobilenet_v2", "scorecam")
    assert list(table.columns) == ["Grad-CAM", "Shap-CAM"]
    assert table.index[0].startswith("Average Drop")
    assert len(table) == 7  # five metrics, then the pointing game's two image counts
    scored = [r for r in table.index if r.startswith(data.COUNT_ROWS)][0]
    gradcam = run.metrics(filters=[("method", "=", "gradcam")])
    assert table.loc[scored, "Grad-CAM"] == gradcam["proportion"].notna().sum()
    summary = run.sql("select method, metric, value from summary")
    for r in summary.to_dict("records"):
        got = table.loc[r["metric"], data.method_titles(run)[r["method"]]]
        assert (math.isnan(got) and (r["value"] is None or math.isnan(r["value"]))) or \
            got == pytest.approx(r["value"])
    # Average Drop is the mean of the per-image values.
    m = run.metrics(filters=[("method", "=", "gradcam")])
    assert table.loc[table.index[0], "Grad-CAM"] == pytest.approx(m["avg_drop"].mean())
    assert data.protocols(run) == ["scorecam"]
    with pytest.raises(StorageError, match="no gradcampp summary"):
        data.paper_table(run, "sample", "mobilenet_v2", "gradcampp")


def test_image_table_filters_and_per_class(runs):
    run = Run(runs / "done")
    table = data.image_table(run, "sample", "mobilenet_v2", "scorecam")
    assert len(table) == 6 and table["complete"].all()
    metrics = run.metrics()
    for r in metrics.to_dict("records"):
        got = table.loc[table["image_id"] == r["image_id"], f"avg_drop:{r['method']}"].iloc[0]
        assert got == pytest.approx(r["avg_drop"])
    chelsea = table[table["image_id"] == "sample_chelsea"].iloc[0]
    # Class names come from the categories stored with the table (ILSVRC index 285).
    assert (chelsea["label"], chelsea["label_name"]) == (285, "Egyptian cat")
    assert chelsea["prediction"] in ("tabby", "tiger cat", "Egyptian cat")
    ranked = data.filter_images(table, metric="avg_drop", method="shapcam",
                                sort_by="avg_drop:shapcam", descending=False)
    assert ranked["avg_drop:shapcam"].is_monotonic_increasing
    mid = float(ranked["avg_drop:shapcam"].median())
    low = data.filter_images(table, metric="avg_drop", method="shapcam", high=mid)
    assert len(low) and (low["avg_drop:shapcam"] <= mid).all()
    assert list(data.filter_images(table, label=285)["image_id"]) == ["sample_chelsea"]
    with pytest.raises(StorageError, match="no column avg_drop:rise"):
        data.filter_images(table, metric="avg_drop", method="rise", low=0)
    per = data.per_class(table, "insertion", ["gradcam", "shapcam"],
                         data.method_titles(Run(runs / "done")))
    assert list(per.columns) == ["Grad-CAM", "Shap-CAM", "images"]
    assert per["images"].sum() == 6
    assert per.loc["Egyptian cat", "Shap-CAM"] == pytest.approx(chelsea["insertion:shapcam"])


def test_map_disagreement_is_one_minus_pearson(runs):
    run = Run(runs / "done")
    ids = ["sample_chelsea", "sample_coffee"]
    same = data.map_disagreement(run, "sample", "mobilenet_v2", "gradcam", "gradcam", ids)
    assert same.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    got = data.map_disagreement(run, "sample", "mobilenet_v2", "gradcam", "shapcam", ids)
    for image_id in ids:
        a, b = (run.maps("sample", "mobilenet_v2", m, ids=[image_id]).values[0]
                .astype(np.float32).reshape(28, 8, 28, 8).mean((1, 3)).ravel()
                for m in ("gradcam", "shapcam"))
        assert got[image_id] == pytest.approx(1 - np.corrcoef(a, b)[0, 1], abs=1e-5)


def test_image_view_reads_one_image(runs):
    run = Run(runs / "done")
    table = data.image_table(run, "sample", "mobilenet_v2", "scorecam")
    view = data.image_view(run, "sample", "mobilenet_v2", "sample_coffee", table)
    assert set(view.maps) == {"gradcam", "shapcam"}
    assert view.maps["shapcam"].shape == (224, 224) and view.photo.shape == (224, 224, 3)
    assert view.stderr.shape == (7, 7) and (view.stderr >= 0).all()
    # Boxes: the annotation's, scaled from the original size to the map frame.
    index = run.image_index("sample").set_index("image_id").loc["sample_coffee"]
    box = index["boxes"][0]
    sx, sy = 224 / index["width"], 224 / index["height"]
    assert view.boxes[0].tolist() == pytest.approx(
        [box["xmin"] * sx, box["ymin"] * sy, box["xmax"] * sx, box["ymax"] * sy], rel=1e-5)
    row = table[table["image_id"] == "sample_coffee"].iloc[0]
    assert view.metrics["gradcam"]["avg_drop"] == pytest.approx(row["avg_drop:gradcam"])
    # The photo is the file the index points to, resized like the model input.
    from PIL import Image

    with Image.open(index["path"]) as im:
        want = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR))
    assert np.array_equal(view.photo, want)
    with pytest.raises(StorageError, match="not in sample/mobilenet_v2"):
        data.image_view(run, "sample", "mobilenet_v2", "nope", table)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_in_a_browser(runs, browser, tmp_path, screenshot_dir, clean_checkout):
    """Start `shapcam dashboard`, open the run, pick an image, see every method's overlay."""
    from selenium.webdriver.common.by import By

    proc, port = _start_dashboard(runs, tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = _Wait(browser, 90)

        wait.until(lambda d: "Runs" in _body(d) and "Run\n" in _body(d))
        _pick(browser, wait, "Run", "done (completed)")
        wait.until(lambda d: "Grad-CAM" in _body(d) and "Average Drop" in _body(d))
        _pick(browser, wait, "Image", "sample_coffee")
        wait.until(lambda d: "sample_coffee: label" in _body(d))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR,
                                                 "[data-testid='stImage'] img")) >= 2)
        captions = _body(browser)
        assert "Grad-CAM" in captions and "Shap-CAM" in captions
        assert len(browser.find_elements(By.CSS_SELECTOR, "div.metrics")) == 2
        time.sleep(1)
        browser.set_window_size(1400, 1800)
        browser.save_screenshot(str(screenshot_dir / "dashboard.png"))
        assert (screenshot_dir / "dashboard.png").stat().st_size > 20_000
        _sql_box_is_sandboxed(browser, wait, runs, tmp_path)
    finally:
        from flows.runtime import stop_process

        stop_process(proc)


def _body(driver) -> str:
    """The page's text."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _start_dashboard(runs: Path, cwd: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "dashboard", "--runs",
         str(runs), "--port", str(port)], cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                        timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.5)


def test_dashboard_picks_the_explained_class_of_a_topk_run(browser, tmp_path, clean_checkout):
    """A --target topk:2 run: the sidebar offers the class, the panel shows that class."""
    pytest.importorskip("timm")
    from selenium.webdriver.common.by import By

    config = _config(tmp_path / "data").replace(
        models=({"name": "timm:test_resnet", "weights": "random", "layer": None},),
        methods=("gradcam",), method_options={}, causal=False, target="topk:2", n_images=2)
    run_dir = str(tmp_path / "runs" / "multi")
    _complete_run(run_dir, "multi", config)
    run = Run(run_dir)
    second = run.images("sample", "timm:test_resnet", slot=1).set_index("image_id")["target"]
    names = data.categories(run, "sample", "timm:test_resnet")
    image_id = second.index[0]
    proc, port = _start_dashboard(tmp_path / "runs", tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = _Wait(browser, 90)

        wait.until(lambda d: "Explained class" in _body(d) and "Grad-CAM" in _body(d))
        _pick(browser, wait, "Explained class", "class 2 of the image's 2")
        _pick(browser, wait, "Image", image_id)
        want = f"explained {names[int(second[image_id])]}"
        wait.until(lambda d: want in _body(d))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR,
                                                 "[data-testid='stImage'] img")) >= 1)
    finally:
        from flows.runtime import stop_process

        stop_process(proc)


def _sql_box_is_sandboxed(browser, wait, runs: Path, tmp_path: Path) -> None:
    """Every hostile query typed into the SQL box is refused on the page, nothing is written,
    and a documented query still shows its table."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from sql_attacks import EXAMPLES, SECRET, attacks

    secret, outside = tmp_path / "secret.csv", tmp_path / "outside"
    secret.write_text(f"token\n{SECRET}\n")
    outside.mkdir()
    before = sorted(runs.rglob("*"))
    tabs = browser.find_elements(By.CSS_SELECTOR, "[role='tab']")
    browser.execute_script("arguments[0].click();", next(
        t for t in tabs if t.get_attribute("textContent").strip() == "SQL"))

    def ask(query: str) -> str:
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "textarea"))
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(query)
        next(b for b in browser.find_elements(By.CSS_SELECTOR, "button")
             if b.text == "Run query").click()
        wait.until(lambda d: f"ran: {query}" in d.find_element(By.TAG_NAME, "body").text)
        return browser.find_element(By.TAG_NAME, "body").text

    for query in attacks(runs / "done", secret, outside):
        page = ask(query)
        alerts = [a.text for a in browser.find_elements(By.CSS_SELECTOR,
                                                        "[data-testid='stAlert']")]
        assert any("query refused" in a or "query failed" in a for a in alerts), (query, alerts)
        assert SECRET not in page, query
    assert sorted(runs.rglob("*")) == before and not any(outside.iterdir())
    ask(EXAMPLES[0])
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='stDataFrame']"))
    assert not [a for a in browser.find_elements(By.CSS_SELECTOR, "[data-testid='stAlert']")
                if "query" in a.text]


class _Wait:
    """WebDriverWait that says what the page showed when it gives up."""

    def __init__(self, browser, seconds: float) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.browser, self.wait = browser, WebDriverWait(browser, seconds)

    def until(self, condition):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By

        try:
            return self.wait.until(condition)
        except TimeoutException:
            text = self.browser.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"timed out; the page shows:\n{text[:3000]}") from None


def _pick(browser, wait, label: str, option: str) -> None:
    """Choose ``option`` in the Streamlit selectbox labelled ``label``."""
    from selenium.webdriver.common.by import By

    boxes = [b for b in browser.find_elements(By.CSS_SELECTOR, "[data-testid='stSelectbox']")
             if b.text.splitlines()[:1] == [label]]
    assert boxes, f"no selectbox {label!r}"
    boxes[0].find_element(By.CSS_SELECTOR, "input").click()
    wait.until(lambda d: any(o.text == option for o in
                             d.find_elements(By.CSS_SELECTOR, "[role='option']")))
    next(o for o in browser.find_elements(By.CSS_SELECTOR, "[role='option']")
         if o.text == option).click()


def test_open_run_of_runs_dir_is_not_a_run(runs):
    with pytest.raises(StorageError):
        open_run(runs / "missing")


def test_the_sql_box_keeps_one_sandbox_per_run_version_across_reruns(runs, monkeypatch):
    """Streamlit reruns the script on every click: the SQL box must not copy the run's tables
    again each time (one locked sandbox per run and version of its tables), and a query that
    tries to change it changes nothing for the next."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    built = []
    real = Run.sandbox
    monkeypatch.setattr(Run, "sandbox", lambda self: built.append(self.root) or real(self))
    monkeypatch.setattr(sys, "argv", ["app.py", "--runs", str(runs)])
    # AppTest runs the script as sys.modules["__main__"]: left there, every process spawned
    # later in this session (Dask's worker processes) would run the dashboard as its main
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    st.cache_resource.clear()
    def session() -> AppTest:
        at = AppTest.from_file(str(REPO / "dashboards" / "app.py"), default_timeout=120).run()
        at.selectbox(key="run").select("done (completed)").run()
        return at

    at = session()
    count = "select count(*) as n from metrics"
    for query in (count, "drop table metrics", count, "select 1; delete from metrics", count):
        at.text_area(key="sql").input(query)
        at.button[0].click().run()
        assert not at.exception, at.exception
        refused = [e.value for e in at.error]
        assert bool(refused) == (query != count), refused
    assert len(built) == 1 and int(at.dataframe[-1].value["n"][0]) == 12
    second = session()
    second.text_area(key="sql").input(count)
    second.button[0].click().run()
    assert len(built) == 1 and not second.exception  # another session: the same sandbox
