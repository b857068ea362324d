"""Dataset readers on tiny fixtures written on the fly in the real on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from shapcam.data import (
    ImageRecord,
    draw_records,
    load_example,
    localisation_filter,
    open_dataset,
    pointing_status,
    read_ilsvrc,
    read_voc,
)
from shapcam.data.readers import imagenet_wnids
from shapcam.errors import ShapCAMError

WNIDS = imagenet_wnids()
TABBY, ESPRESSO = 281, 967


def xml(path: Path, size, objects, difficult=None) -> None:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(bool(difficult and difficult[i]))}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
        "</bndbox></object>" for i, (n, b) in enumerate(objects))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height>"
                    f"<depth>3</depth></size>{objs}</annotation>")


def jpeg(path: Path, size=(40, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        path, format="JPEG")


@pytest.fixture
def kaggle(tmp_path) -> Path:
    root = tmp_path / "kaggle"
    root.mkdir()
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} name{i}\n"
                                                         for i, w in enumerate(WNIDS)))
    data, ann = root / "ILSVRC/Data/CLS-LOC/val", root / "ILSVRC/Annotations/CLS-LOC/val"
    jpeg(data / "ILSVRC2012_val_00000001.JPEG")
    xml(ann / "ILSVRC2012_val_00000001.xml", (40, 20),
        [(WNIDS[TABBY], (2, 3, 30, 10)), (WNIDS[TABBY], (1, 1, 5, 5))])
    jpeg(data / "ILSVRC2012_val_00000002.JPEG")  # only in the CSV
    jpeg(data / "ILSVRC2012_val_00000003.JPEG")  # no annotation at all
    (data / "ILSVRC2012_val_00000004.JPEG").write_bytes(b"\xff\xd8 truncated jpeg")
    xml(ann / "ILSVRC2012_val_00000004.xml", (40, 20), [(WNIDS[ESPRESSO], (0, 0, 5, 5))])
    jpeg(data / "ILSVRC2012_val_00000005.JPEG")
    xml(ann / "ILSVRC2012_val_00000005.xml", (40, 20), [(WNIDS[ESPRESSO], (10, 5, 60, 15))])
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000002,{WNIDS[ESPRESSO]} 4 2 20 18 \n")
    return root


def test_kaggle_layout(kaggle):
    recs = {r.image_id: r for r in read_ilsvrc(kaggle)}
    assert len(recs) == 5
    r1 = recs["ILSVRC2012_val_00000001"]
    assert r1.label == TABBY and r1.size == (40, 20) and r1.boxes[TABBY].shape == (2, 4)
    x, boxes, size = load_example(r1)
    assert x.shape == (3, 224, 224) and size == (40, 20)
    # x scales by 224/40, y by 224/20 (a non-square image: no transposition)
    np.testing.assert_allclose(boxes[TABBY][0].numpy(), [2 * 5.6, 3 * 11.2, 30 * 5.6, 10 * 11.2],
                               rtol=1e-6)
    r2 = recs["ILSVRC2012_val_00000002"]
    assert r2.label == ESPRESSO and r2.error is None and r2.boxes[ESPRESSO].tolist() == [
        [4, 2, 20, 18]]
    assert "no annotation" in recs["ILSVRC2012_val_00000003"].error
    with pytest.raises(ShapCAMError, match="ILSVRC2012_val_00000004.JPEG is not a readable"):
        load_example(recs["ILSVRC2012_val_00000004"])
    with pytest.raises(ShapCAMError, match=r"ILSVRC2012_val_00000005.JPEG: box .* outside"):
        load_example(recs["ILSVRC2012_val_00000005"])


@pytest.fixture
def original(tmp_path) -> Path:
    root = tmp_path / "orig"
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # meta.mat lists synsets in ILSVRC2012_ID order, which is not the sorted order.
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
             ("num_children", "O"), ("children", "O"), ("wordnet_height", "O"),
             ("num_train_images", "O")]
    synsets = np.array([(1, WNIDS[ESPRESSO], "espresso", "", 0, [], 0, 1300),
                        (2, WNIDS[TABBY], "tabby", "", 0, [], 0, 1300),
                        (1001, "n00001740", "entity", "", 2, [1, 2], 19, 0)], dtype=dtype)
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    for i in (1, 2):
        jpeg(root / "ILSVRC2012_img_val" / f"ILSVRC2012_val_{i:08d}.JPEG", (30, 30))
    xml(root / "ILSVRC2012_bbox_val_v3/val/ILSVRC2012_val_00000001.xml", (30, 30),
        [(WNIDS[TABBY], (1, 2, 10, 20))])
    return root


def test_original_layout(original):
    recs = read_ilsvrc(original)
    assert [r.label for r in recs] == [TABBY, ESPRESSO]
    assert recs[0].boxes[TABBY].tolist() == [[1, 2, 10, 20]] and recs[1].boxes == {}
    assert all(r.error is None for r in recs)


def test_not_a_dataset(tmp_path):
    with pytest.raises(ShapCAMError, match="is not an ILSVRC2012 val folder"):
        read_ilsvrc(tmp_path)
    with pytest.raises(ShapCAMError, match="ImageSets/Main"):
        read_voc(tmp_path)


def test_voc_layout(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n000003\n")
    jpeg(voc / "JPEGImages" / "000001.jpg", (50, 40))
    xml(voc / "Annotations" / "000001.xml", (50, 40),
        [("dog", (1, 1, 20, 20)), ("person", (5, 5, 40, 39)), ("dog", (30, 2, 49, 10))],
        difficult=[0, 1, 0])
    jpeg(voc / "JPEGImages" / "000002.jpg")
    xml(voc / "Annotations" / "000002.xml", (40, 20), [("unicorn", (1, 1, 5, 5))])
    recs = read_voc(tmp_path / "VOCdevkit")
    r = recs[0]
    assert r.label == 11 and r.labels == (11, 14)  # dog, person
    assert r.boxes[11].shape == (2, 4) and r.difficult[14].tolist() == [True]
    assert "unknown VOC class 'unicorn'" in recs[1].error
    assert "000003.xml is missing" in recs[2].error


def test_sampling_is_deterministic_and_order_free(kaggle):
    recs = read_ilsvrc(kaggle)
    a = [r.image_id for r in draw_records(recs, 3, seed=1)]
    b = [r.image_id for r in draw_records(list(reversed(recs)), 3, seed=1)]
    assert a == b and len(set(a)) == 3
    assert [r.image_id for r in draw_records(recs, 3, seed=2)] != a or len(recs) == 3
    with pytest.raises(ShapCAMError, match="n_images must be >= 1"):
        draw_records(recs, 0)


def test_localisation_filter(kaggle):
    recs = {r.image_id: r for r in read_ilsvrc(kaggle)}
    assert not localisation_filter(recs["ILSVRC2012_val_00000001"])  # two boxes
    one = recs["ILSVRC2012_val_00000004"]  # one 5x5 box in a 40x20 image
    assert localisation_filter(one)
    assert not localisation_filter(one, max_area=0.01)
    assert pointing_status(recs["ILSVRC2012_val_00000001"]) == "filtered"
    assert pointing_status(one) == "scored" and pointing_status(one, max_area=0.01) == "filtered"
    other = next(c for c in range(1000) if c != one.label)
    assert pointing_status(one, other) == "no box"  # e.g. a misclassified image
    bare = ImageRecord("x", Path("x.jpg"), 3)
    assert pointing_status(bare) == "unannotated" and not localisation_filter(bare)


def test_sample_dataset_is_read_by_the_real_reader(tmp_path):
    recs = open_dataset("sample", tmp_path / "sample")
    assert len(recs) == 6 and all(r.error is None for r in recs)
    labels = {r.image_id: r.label for r in recs}
    assert labels["sample_chelsea"] == 285 and labels["sample_coffee"] == 967
    for r in recs:
        x, boxes, _ = load_example(r)
        assert x.shape == (3, 224, 224) and boxes[r.label].shape == (1, 4)
    again = open_dataset("sample", tmp_path / "sample")  # idempotent
    assert [r.image_id for r in again] == [r.image_id for r in recs]
