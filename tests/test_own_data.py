"""Your own model on your own data: a factory by import path (tests/own_models.py), any input
size and normalisation, image folders, manifests, COCO boxes and images behind fsspec URLs."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from shapcam.data import open_dataset
from shapcam.errors import ShapCAMError
from shapcam.methods import build_method
from shapcam.zoo.models import load_model
from storage import open_run
from tasks.config import ModelSpec, RunConfig
from tasks.pipeline import aggregate, evaluate_shard, explain_shard, plan_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # as a user's project on PYTHONPATH
import own_models  # noqa: E402

SHAPES = own_models.SHAPES
OWN = "own_models:three_shapes"


def draw_shape(kind: str, size: tuple[int, int], box: tuple[int, int, int, int],
               seed: int) -> Image.Image:
    """A noisy grey picture with one coloured ``kind`` inside ``box`` (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(90, 140, (size[1], size[0], 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    colour = {"circle": (220, 40, 40), "square": (40, 200, 40), "triangle": (40, 40, 220)}[kind]
    if kind == "circle":
        d.ellipse(box, fill=colour)
    elif kind == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
    return img


def make_shapes(root: Path, per_class: int = 2, size: tuple[int, int] = (80, 60)) -> dict:
    """An ImageFolder of shapes under ``root`` and the COCO instances dict of their boxes."""
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(SHAPES)]}
    for c, kind in enumerate(SHAPES):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            x0, y0 = 8 + 10 * k + 4 * c, 6 + 5 * k
            box = (x0, y0, x0 + 24, y0 + 22)
            name = f"{kind}/{k}.png"
            draw_shape(kind, size, box, seed=10 * c + k).save(root / name)
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": name, "width": size[0],
                                   "height": size[1]})
            coco["annotations"].append({"id": image_id, "image_id": image_id, "iscrowd": 0,
                                        "category_id": c + 1, "area": 24 * 22,
                                        "bbox": [box[0], box[1], 24, 22]})
    return coco


@pytest.fixture
def shapes(tmp_path) -> tuple[Path, Path]:
    """``(image folder, COCO file)``."""
    root = tmp_path / "shapes"
    coco = make_shapes(root)
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return root, tmp_path / "instances.json"


# -- models -------------------------------------------------------------------------------

def test_a_factory_declares_its_layer_classes_frame_and_normalisation():
    lm = load_model(OWN, "factory")
    assert (lm.input_size, lm.target_layer, lm.categories, lm.weights) == (
        64, "features", SHAPES, "factory")
    # its own mean/std in front of its forward: ImageNet-normalised input becomes its own
    x01 = torch.rand(2, 3, 64, 64)
    bare = own_models.TinyNet(3).eval()
    bare.load_state_dict(lm.model.state_dict())
    from shapcam.zoo.preprocessing import normalize

    own = (x01 - torch.tensor(own_models.MEAN).view(1, 3, 1, 1)) / torch.tensor(
        own_models.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(lm.model(normalize(x01)), bare(own), atol=1e-5)
    # every worker builds the same model (the factory runs under the fixed seed)
    again = load_model("own_models:untraceable", "factory")
    lm = load_model("own_models:untraceable", "factory")
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(),
                                                 again.model.state_dict().values(), strict=True))
    plain = load_model("own_models:plain_module")
    assert (plain.input_size, plain.target_layer, len(plain.categories)) == (224, "features", 4)


def test_a_state_dict_or_checkpoint_loads_on_top(tmp_path):
    lm = load_model(OWN, "factory")
    state = {k: v + 1 for k, v in lm.model.state_dict().items()}
    torch.save({"state_dict": state, "categories": ["a", "b", "c"]}, tmp_path / "best.pt")
    loaded = load_model(OWN, str(tmp_path / "best.pt"))
    assert loaded.categories == ["a", "b", "c"] and loaded.weights.endswith("best.pt")
    assert torch.equal(loaded.model.fc.bias, state["fc.bias"])
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ShapCAMError, match="does not fit"):
        load_model(OWN, str(tmp_path / "wrong.pt"))
    with pytest.raises(ShapCAMError, match="unknown weights 'IMAGENET1K_V2'.*factory"):
        load_model(OWN, "IMAGENET1K_V2")


@pytest.mark.parametrize(("name", "message"), [
    ("no_such_pkg.models:build", "module 'no_such_pkg' cannot be imported"),
    ("own_models:missing", "own_models has no attribute 'missing'"),
    ("own_models:SHAPES", "is a list, not a callable"),
    ("own_models:not_a_model", "returned a str, not an nn.Module"),
    ("resnt18:IMAGENET1K_V1", "did you mean the torchvision model resnet18"),
])
def test_a_factory_that_cannot_be_used_is_one_line(name, message):
    with pytest.raises(ShapCAMError, match=message) as info:
        spec = ModelSpec.parse(name)
        load_model(spec.name, spec.weights)
    assert "\n" not in str(info.value)


def test_an_untraceable_model_takes_the_hook_path_with_the_same_maps():
    gated = load_model("own_models:untraceable")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam = build_method("gradcam", gated)
    assert any("falling back" in str(w.message) for w in caught)
    twin = own_models.TinyNet(3).eval()
    twin.load_state_dict(gated.model.state_dict())
    x = torch.randn(2, 3, 48, 48)
    got = cam(x, 1).maps
    want = build_method("gradcam", twin, target_layer="features")(x, 1).maps
    assert got.shape == (2, 48, 48) and torch.allclose(got, want, atol=1e-6)


# -- datasets ------------------------------------------------------------------------------

def test_an_image_folder_with_coco_boxes(shapes, tmp_path):
    root, coco = shapes
    records = open_dataset("folder", root, categories=SHAPES, boxes=coco)
    assert [r.image_id for r in records] == [f"{k}/{i}" for k in SHAPES for i in range(2)]
    assert [r.label for r in records] == [0, 0, 1, 1, 2, 2]
    r = records[3]  # square/1: box (8 + 10 + 4, 11, +24, +22)
    assert r.size == (80, 60) and r.labels == (1,)
    np.testing.assert_array_equal(r.boxes[1], [[22, 11, 46, 33]])
    # names through a class map; an unknown folder is that image's error, not the run's
    (root / "zebra").mkdir()
    draw_shape("circle", (40, 40), (5, 5, 20, 20), 0).save(root / "zebra" / "z.png")
    (tmp_path / "map.json").write_text(json.dumps({"circle": "square", "square": 0}))
    mapped = {r.image_id: r for r in open_dataset("folder", root, categories=SHAPES,
                                                  class_map=tmp_path / "map.json")}
    assert (mapped["circle/0"].label, mapped["square/0"].label) == (1, 0)
    assert "label 'zebra' is not a class" in mapped["zebra/z"].error
    # a flat folder: no labels (the predicted class is explained)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        draw_shape("square", (50, 40), (5, 5, 25, 25), i).save(flat / f"{i}.jpg")
    assert [(r.image_id, r.label, r.error) for r in open_dataset("folder", flat)] == [
        ("0", -1, None), ("1", -1, None)]


def test_a_manifest_reports_bad_rows_per_image(shapes, tmp_path):
    root, _ = shapes
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = ["path,label,xmin,ymin,xmax,ymax",
            *[f"{root.name}/{k}/{i}.png,{k},,,," for k in SHAPES for i in range(2)],
            f"{root.name}/circle/0.png,,12,6,36,28",  # a second row: a box of the same image
            "missing.png,circle,,,,", "broken.png,square,,,,", f"{root.name}/square/0.png,"
            "zebra,,,,"]
    rows[-1] = f"{root.name}/square/1.png,square,1,2,3,x"  # a bad box
    rows.append("elsewhere.png,zebra,,,,")
    (tmp_path / "list.csv").write_text("\n".join(rows))
    records = {r.image_id: r for r in open_dataset("manifest", tmp_path / "list.csv",
                                                   categories=SHAPES)}
    assert len(records) == 9
    np.testing.assert_array_equal(records["shapes/circle/0"].boxes[0], [[12, 6, 36, 28]])
    assert "four numbers" in records["shapes/square/1"].error
    assert "label 'zebra' is not a class" in records["elsewhere"].error
    assert records["missing"].error is None  # found missing when it is decoded
    # the same table as Parquet (typed columns: integer labels are class indices)
    import pandas as pd

    table = pd.read_csv(tmp_path / "list.csv", dtype=str, keep_default_na=False)
    table["label"] = table["label"].map(lambda v: SHAPES.index(v) if v in SHAPES else v)
    table.astype({"label": str}).to_parquet(tmp_path / "list.parquet")
    again = {r.image_id: r for r in open_dataset("manifest", tmp_path / "list.parquet",
                                                 categories=SHAPES)}
    assert [(r.image_id, r.label, r.error is None) for r in again.values()] == [
        (r.image_id, r.label, r.error is None) for r in records.values()]
    with pytest.raises(ShapCAMError, match="no path column.*columns: file_name"):
        (tmp_path / "bad.csv").write_text("file_name\nx.png")
        open_dataset("manifest", tmp_path / "bad.csv")


def run_all(run_dir: Path, config: RunConfig):
    plan = plan_run(str(run_dir), "run-own", config)
    for k, records in enumerate(plan["shards"]):
        explain_shard(str(run_dir), config, config.models[0], k, records)
        evaluate_shard(str(run_dir), config, config.models[0], k, records)
    return plan, aggregate(str(run_dir), config)


def test_a_manifest_run_records_three_failures_and_finishes(shapes, tmp_path):
    root, coco = shapes
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = ["path,label", *[f"shapes/{k}/{i}.png,{k}" for k in SHAPES for i in range(2)],
            "missing.png,circle", "broken.png,square", "shapes/circle/1.png,zebra"]
    rows.remove("shapes/circle/1.png,circle")
    (tmp_path / "list.csv").write_text("\n".join(rows))
    config = RunConfig.build(dataset="manifest", root=tmp_path / "list.csv", models=OWN,
                             methods="gradcam,rise", settings=["rise.n_masks=50"],
                             boxes=coco, causal=False)
    run_all(tmp_path / "run", config)
    run = open_run(tmp_path / "run")
    m = run.metrics([("method", "=", "gradcam")])
    failed = m[m["error"].notna()].set_index("image_id")["error"]
    assert sorted(failed.index) == ["broken", "missing", "shapes/circle/1"]
    assert "does not exist" in failed["missing"] and "not a readable image" in failed["broken"]
    assert "zebra" in failed["shapes/circle/1"]
    done = m[m["error"].isna()]
    assert len(done) == 5 and done["y"].notna().all()
    assert set(done["pointing"]) <= {"scored", "no box", "filtered"}
    spec, group = run.store.table("manifest", OWN)
    assert spec.map_shape == (64, 64) and group.attrs["input_size"] == 64
    maps = run.maps("manifest", OWN, "gradcam", ids=["shapes/square/0"])
    assert maps.shape == (1, 64, 64) and float(maps.max()) == 1.0


def test_images_behind_an_fsspec_url(shapes, tmp_path):
    import fsspec

    root, coco = shapes
    mem = fsspec.filesystem("memory")
    for f in sorted(root.rglob("*.png")):
        mem.pipe(f"/own-data/{f.relative_to(root).as_posix()}", f.read_bytes())
    try:
        config = RunConfig.build(dataset="folder", root="memory://own-data", models=OWN,
                                 methods="gradcam", boxes=coco, causal=False)
        local = config.replace(root=str(root))
        run_all(tmp_path / "url", config)
        run_all(tmp_path / "disk", local)
        mem.rm("/own-data/square/1.png")  # listed by the plan, gone when its shard runs
        plan = plan_run(str(tmp_path / "gone"), "run-gone", config)
    finally:
        mem.rm("/own-data", recursive=True)
    url, disk = (open_run(tmp_path / p).metrics().set_index("image_id") for p in ("url", "disk"))
    assert len(url) == 6 and url["error"].isna().all()
    np.testing.assert_allclose(url["avg_drop"], disk.loc[url.index, "avg_drop"], rtol=1e-6)
    assert (url["pointing"] == disk.loc[url.index, "pointing"]).all()
    assert open_run(tmp_path / "url").image_index("folder")["path"].iloc[0].startswith(
        "memory://")
    assert plan["n_images"] == 5


def test_input_frames_scale_the_deletion_steps():
    from shapcam.evaluation.metrics import step_in_frame

    config = RunConfig()
    assert [config.causal_pixels_at(s) for s in (224, 32, 299)] == [224, 5, 399]
    assert [math.ceil(s * s / step_in_frame(224, s)) for s in (224, 32, 299)] == [224, 205, 225]
    with pytest.raises(ShapCAMError, match="input size 8 is not a square side"):
        ModelSpec("own_models:three_shapes", input_size=8)


# -- end to end: `shapcam run` on local Dask workers ----------------------------------------

def user_project(tmp_path: Path) -> Path:
    """A user's project folder holding their model module (not on any path of this test)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "own_models.py").write_text((HERE / "own_models.py").read_text())
    return project


def shapcam_cli(project: Path, *args: str, timeout: float = 540):
    """The installed ``shapcam`` command run from ``project`` (its working directory is how
    the model module is found, also by the spawned Dask workers)."""
    import os
    import subprocess

    script = Path(sys.executable).parent / "shapcam"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c",
                                                 "from flows.cli import app; app()"]
    env = {**os.environ, "PREFECT_HOME": str(project / "prefect"),
           "PYTHONPATH": str(HERE.parent)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([*cmd, *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_factory_that_cannot_be_imported_stops_the_command_before_anything_starts(tmp_path):
    res = shapcam_cli(tmp_path, "run", "--models", "no_such_pkg.models:build", "--store",
                      str(tmp_path / "runs"), timeout=120)
    lines = [line for line in res.stderr.splitlines() + res.stdout.splitlines() if line]
    assert res.returncode == 2 and len(lines) == 1, lines
    assert "no_such_pkg" in lines[0] and "PYTHONPATH" in lines[0]
    # no run folder, no Prefect database (no server started)
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "prefect").glob("*"))
    assert "Traceback" not in res.stderr


def hand_metrics(path: Path, saliency: np.ndarray, target: int, box: np.ndarray
                 ) -> tuple[float, float]:
    """``(avg_drop, proportion)`` of one image computed by hand: the bare model fed its own
    normalisation, the top half of the map kept, the box scaled into the 64 x 64 frame."""
    from torchvision.transforms.v2 import functional as TF

    img = Image.open(path).convert("RGB")
    x01 = TF.to_dtype(TF.resize(TF.to_image(img), [64, 64], antialias=True), torch.float32,
                      scale=True).as_subclass(torch.Tensor).unsqueeze(0)
    lm = load_model(OWN)
    bare = own_models.TinyNet(3).eval()
    bare.load_state_dict(lm.model.state_dict())
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (own_models.MEAN, own_models.STD))
    flat = saliency.reshape(-1)
    keep = np.zeros_like(flat)
    top = np.argsort(-flat, kind="stable")[: math.ceil(flat.size / 2)]
    keep[top] = flat[top]
    masked = x01 * torch.from_numpy(keep.reshape(64, 64)).float()
    with torch.no_grad():
        y, o = (bare((v - mean) / std).softmax(1)[0, target].item() for v in (x01, masked))
    w, h = img.size
    x0, y0, x1, y1 = box * np.array([64 / w, 64 / h, 64 / w, 64 / h])
    c = np.arange(64) + 0.5
    inside = ((c[:, None] >= y0) & (c[:, None] <= y1)) & ((c[None, :] >= x0) & (c[None, :] <= x1))
    return 100 * max(0.0, y - o) / y, float((saliency * inside).sum() / saliency.sum())


@pytest.mark.slow
def test_own_model_on_own_folder_end_to_end(shapes, tmp_path):
    root, coco = shapes
    project = user_project(tmp_path)
    args = ("run", "--dataset", "folder", "--root", str(root), "--boxes", str(coco),
            "--models", OWN, "--target", "label", "--preset", "quick", "--set",
            "shapcam.permutations=16", "--set", "mask.iterations=20", "--set",
            "rise.n_masks=100", "--shard-size", "3", "--workers", "2", "--store", "runs",
            "--run-id", "own")
    res = shapcam_cli(project, *args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = open_run(project / "runs" / "own")
    m = run.metrics()
    assert len(m) == 36 and m["error"].isna().all() and set(m["method"]) == {
        "mask", "rise", "gradcam", "gradcampp", "scorecam", "shapcam"}
    assert (m["pointing"] == "scored").all() and m["deletion"].notna().all()
    assert (m["target"] == m["label"]).all() and set(m["label"]) == {0, 1, 2}
    # one image by hand: Average Drop and the energy pointing game in the model's frame
    assert (m[m["method"] == "gradcam"]["y"] > 0.7).all()  # it tells the shapes apart
    for method in ("gradcam", "rise", "shapcam"):
        row = m[(m["method"] == method) & (m["image_id"] == "square/1")].iloc[0]
        saliency = run.maps("folder", OWN, method, ids=["square/1"]).values[0]
        drop, proportion = hand_metrics(root / "square/1.png", saliency.astype(np.float32),
                                        1, np.array([22, 11, 46, 33], dtype=np.float64))
        assert row["avg_drop"] == pytest.approx(drop, rel=1e-4, abs=1e-4), method
        assert row["proportion"] == pytest.approx(proportion, rel=1e-4), method
        if method != "rise":  # 100 masks: too noisy for this
            # the shape's box holds 11% of the picture: at least twice that of the energy
            assert proportion > 2 * (24 * 22) / (80 * 60), method

    got = run.sql("select count(*) as n from metrics where model = 'own_models:three_shapes'")
    assert int(got["n"].iloc[0]) == 36
    again = shapcam_cli(project, *args)  # resume of a finished run: nothing to do
    assert again.returncode == 0 and "tasks: none to run" in again.stdout


@pytest.mark.slow
def test_a_32_and_a_299_pixel_model_end_to_end(tmp_path):
    project = user_project(tmp_path)
    flat = tmp_path / "photos"
    flat.mkdir()
    for i, kind in enumerate(SHAPES[:2]):
        draw_shape(kind, (120, 90), (30, 20, 80, 70), i).save(flat / f"{kind}.jpg")
    res = shapcam_cli(project, "run", "--dataset", "folder", "--root", str(flat), "--models",
                      "own_models:cifar_wrn,own_models:mobilenet_299", "--preset", "quick",
                      "--set", "shapcam.permutations=8", "--set", "mask.iterations=5",
                      "--set", "rise.n_masks=40", "--set", "scorecam.max_channels=16",
                      "--set", "rise.batch_size=20", "--n-images", "1", "--workers", "2",
                      "--store", "runs", "--run-id", "sizes")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = open_run(project / "runs" / "sizes")
    m = run.metrics()
    assert len(m) == 2 * 6 and m["error"].isna().all() and (m["label"] == -1).all()
    assert m["deletion"].notna().all() and (m["pointing"] == "unannotated").all()
    for model, side in (("own_models:cifar_wrn", 32), ("own_models:mobilenet_299", 299)):
        spec, group = run.store.table("folder", model)
        assert spec.map_shape == (side, side) and group.attrs["input_size"] == side
        maps = run.maps("folder", model, "shapcam")
        assert maps.shape == (1, side, side) and np.isfinite(maps.values).all()
    assert (project / "runs" / "sizes" / "report.md").exists() or list(
        (project / "runs" / "sizes").glob("report*"))


def test_the_readme_example_folder_reads_with_its_boxes():
    examples = HERE.parent / "docs" / "examples"
    records = open_dataset("folder", examples / "shapes", categories=SHAPES,
                           boxes=examples / "shapes-instances.json")
    assert [r.label for r in records] == [0, 0, 1, 1, 2, 2]
    assert all(r.error is None and r.size == (80, 60) and len(r.boxes[r.label]) == 1
               for r in records)
    lm = load_model(OWN)
    from shapcam.data import load_example

    x = torch.stack([load_example(r, lm.input_size)[0] for r in records])
    with torch.no_grad():  # the example model tells the example shapes apart
        assert lm.model(x).argmax(1).tolist() == [0, 0, 1, 1, 2, 2]


def test_a_run_folder_cannot_make_evaluate_store_import_a_module(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from storage import SaliencyStore

    (tmp_path / "tripwire.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('tripped').write_text('ran')\n"
        "def build():\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RunConfig.build(dataset="folder", root=HERE.parent / "docs/examples/shapes",
                             models=OWN, methods="gradcam", causal=False)
    plan_run(str(tmp_path / "run"), "run-x", config)
    store = SaliencyStore(tmp_path / "run")
    hostile = {**store.attrs["config"], "models": [{"name": "tripwire:build",
                                                    "weights": "factory", "layer": None}]}
    store.update_attrs({"config": hostile})
    res = CliRunner().invoke(app, ["evaluate-store", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--allow-models tripwire:build" in res.output
    assert not (tmp_path / "tripped").exists() and "tripwire" not in sys.modules


def test_bad_box_and_class_map_files_are_one_line(shapes, tmp_path, monkeypatch):
    import shapcam.data.coco

    root, coco = shapes
    cases = {"not json {": "not COCO instances JSON", '{"images": 3}': "not COCO instances JSON",
             json.dumps({"images": [], "annotations": [], "categories": [
                 {"id": 1, "name": "zebra"}]}): "none of its categories"}
    for text, message in cases.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ShapCAMError, match=message) as info:
            open_dataset("folder", root, categories=SHAPES, boxes=tmp_path / "bad.json")
        assert "\n" not in str(info.value)
    monkeypatch.setattr(shapcam.data.coco, "MAX_COCO_BYTES", 100)  # read whole: bounded
    with pytest.raises(ShapCAMError, match="box file .* is over 0 MB"):
        open_dataset("folder", root, categories=SHAPES, boxes=coco)
    (tmp_path / "map.json").write_text('["a list"]')
    with pytest.raises(ShapCAMError, match="must be a JSON object"):
        open_dataset("folder", root, categories=SHAPES, class_map=tmp_path / "map.json")
