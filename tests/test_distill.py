"""Knowledge distillation from explanations (paper Table 4) and the VOC fine-tuning: models,
data, differentiable student maps, losses, resumable training, both flows end to end."""

from __future__ import annotations

import itertools
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shapcam import GradCAM, GradCAMPlusPlus, ScoreCAM
from shapcam.errors import ShapCAMError
from shapcam.methods.shapley import exact_shapley
from shapcam.training.cifar import batches, load_cifar10, load_digits32
from shapcam.training.distillation import Variant, parse_variants, train_student, train_teacher
from shapcam.training.losses import interpret_loss, kd_loss
from shapcam.training.maps import shapley_gap_fc, student_maps
from shapcam.training.train import Checkpoint, Schedule
from shapcam.training.wrn import n_parameters, wrn

REPO = Path(__file__).resolve().parents[1]


def test_wide_resnet_parameter_counts():
    # The paper: WRN-40-2 teacher 2.2 M, WRN-16-2 student 0.7 M parameters.
    assert n_parameters(wrn("wrn-40-2")) == 2_243_546
    assert n_parameters(wrn("wrn-16-2")) == 691_674
    assert wrn("wrn-16-2").features(torch.zeros(1, 3, 32, 32)).shape == (1, 128, 8, 8)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wrn("wrn-15-2")


def write_cifar(root: Path, n: int = 20, seed: int = 0) -> Path:
    """A tiny CIFAR-10 in the real cifar-10-batches-py pickle layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        # Class-dependent brightness, so that a model can learn something in one epoch.
        data = np.clip(data // 4 + (labels * 18)[:, None], 0, 255).astype(np.uint8)
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(),
                         b"batch_label": name.encode()}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10}, f)
    return root


def test_cifar_reader_and_errors(tmp_path):
    write_cifar(tmp_path, n=6)
    data = load_cifar10(tmp_path)
    assert data.train_x.shape == (30, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (6, 32, 32, 3) and data.train_y.dtype == np.int64
    # The layout is channel-planar rows of 1024 values: pixel (0, 0) of image 0, channel 1.
    with (tmp_path / "cifar-10-batches-py" / "data_batch_1").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert data.train_x[0, 0, 0, 1] == raw[0, 1024]
    assert load_cifar10(tmp_path / "cifar-10-batches-py").train_x.shape[0] == 30
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ShapCAMError, match="missing data_batch_3.*torchvision"):
        load_cifar10(tmp_path)


def test_digits_and_augmentation_are_deterministic():
    d = load_digits32()
    assert d.train_x.shape[1:] == (32, 32, 3) and len(d.train_x) + len(d.test_x) == 1797
    assert not d.flip
    a = [b[3].tolist() for b in batches(d.train_x, d.train_y, 64, seed=1, epoch=2, train=True)]
    b = [b[3].tolist() for b in batches(d.train_x, d.train_y, 64, seed=1, epoch=2, train=True)]
    assert a == b
    x1 = next(batches(d.train_x, d.train_y, 8, seed=1, epoch=2, train=True))[0]
    x2 = next(batches(d.train_x, d.train_y, 8, seed=1, epoch=2, train=True))[0]
    assert torch.equal(x1, x2)
    # Maps travel with their image: the same crop and flip.
    extra = torch.arange(len(d.train_y) * 32 * 32, dtype=torch.float32).view(-1, 32, 32)
    x, _, e, idx = next(batches(d.train_x, d.train_y, 4, seed=0, epoch=0, train=True,
                                flip=True, extra=extra))
    assert e.shape == (4, 32, 32)
    moved = set(e[0].flatten().tolist()) - {0.0}
    assert moved <= set(extra[idx[0]].flatten().tolist())


def small_wrn() -> torch.nn.Module:
    torch.manual_seed(0)
    return wrn("wrn-10-1").eval()


def test_student_maps_equal_the_engine_maps():
    model = small_wrn()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 4, 7])
    for method, engine in (("gradcam", GradCAM(model, "features")),
                           ("gradcampp", GradCAMPlusPlus(model, "features")),
                           ("scorecam", ScoreCAM(model, "features"))):
        _, got = student_maps(model, method, x, y, max_channels=64)
        torch.testing.assert_close(got.detach(), engine(x, y).raw, atol=1e-5, rtol=1e-4)


def test_differentiable_shapley_with_every_order_is_exact():
    """4 positions, all 24 orders: the estimate is the exact Shapley value of the head's game."""
    model = small_wrn()
    A = torch.relu(torch.randn(2, 64, 2, 2, generator=torch.Generator().manual_seed(2)))
    targets = torch.tensor([3, 5])
    orders = torch.tensor(list(itertools.permutations(range(4))))
    phi = shapley_gap_fc(A, model.fc.weight, model.fc.bias, targets, orders)

    def game(index, masks):  # v(S) = softmax(fc(mean(A * 1_S)))_c, zero baseline
        a = A[index] * masks.view(-1, 1, 2, 2).to(A.dtype)
        return model.head(a).softmax(1).gather(1, targets[index].view(-1, 1))[:, 0]

    from shapcam.methods.shapley import FunctionGame

    exact = exact_shapley(FunctionGame(game, 4, 2, indexed=True)).phi
    torch.testing.assert_close(phi.reshape(2, 4).double(), exact.double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "scorecam", "shapcam"])
def test_interpret_loss_gradients_reach_the_student(method):
    model = small_wrn().train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    teacher = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(4))
    orders = torch.rand(8, 64, generator=torch.Generator().manual_seed(5)).argsort(1)
    _, smap = student_maps(model, method, x, y, orders=orders, max_channels=4)
    loss = interpret_loss(smap, teacher)
    model.zero_grad()
    loss.backward()
    grads = [model.features[0].weight.grad, model.features[1].conv1.weight.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    if method in ("gradcam", "gradcampp", "shapcam"):  # through the head's weights too
        assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", [None, "gradcam", "gradcampp", "scorecam", "shapcam"])
def test_a_training_step_keeps_the_student_training(method):
    """With every explanation loss, the student stays in training mode (also on the first step,
    which builds the Score-CAM scorer) and its BatchNorm statistics move exactly as in a plain
    cross-entropy step: one train-mode pass of the batch, no masked forward counted."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    plain = small_wrn().train()
    torch.nn.functional.cross_entropy(plain(x), y).backward()
    model = small_wrn().train()
    orders = torch.rand(8, 64, generator=torch.Generator().manual_seed(5)).argsort(1)
    for _ in range(2):  # the first step builds the scorer, the second reuses it
        if method is None:
            logits, loss = model(x), 0
        else:
            logits, smap = student_maps(model, method, x, y, orders=orders, max_channels=4)
            loss = interpret_loss(smap, torch.rand(4, 32, 32))
        (torch.nn.functional.cross_entropy(logits, y) + loss).backward()
        assert all(m.training for m in model.modules())
    bns = [k for k in model.state_dict() if "running" in k or "num_batches" in k]
    assert bns
    stats_after_one_step = {k: v.clone() for k, v in plain.state_dict().items() if k in bns}
    plain.train()(x)  # the second plain step
    for k in bns:
        torch.testing.assert_close(model.state_dict()[k], plain.state_dict()[k], msg=k)
    assert any(not torch.equal(stats_after_one_step[k], model.state_dict()[k]) for k in bns)


def test_losses_on_hand_built_cases():
    a = torch.zeros(1, 4, 4)
    a[0, 0, 0] = 1.0
    b = torch.zeros(1, 4, 4)
    b[0, 3, 3] = 2.0
    assert float(interpret_loss(a, 5 * a, size=4)) == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert float(interpret_loss(a, b, size=4)) == pytest.approx(2.0)  # disjoint supports
    c = torch.zeros(1, 4, 4)
    c[0, 0, 0] = c[0, 3, 3] = 1.0  # halfway: |(1,0) - (1,1)/sqrt2|^2 = 2 - sqrt2
    assert float(interpret_loss(a, c, size=4)) == pytest.approx(2 - math.sqrt(2))
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[4.0, 0.0]])
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    # T = 4: teacher probs (e/(e+1), 1/(e+1)), student uniform; KL * T^2.
    p = torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)])
    want = float((p * (p / 0.5).log()).sum()) * 16
    assert float(kd_loss(s, t, temperature=4.0)) == pytest.approx(want, rel=1e-6)


def test_variants_and_schedule():
    assert len(parse_variants("all")) == 10
    assert [v.name for v in parse_variants("ce,shapcam+kd")] == ["ce", "shapcam+kd"]
    with pytest.raises(ValueError, match="unknown configuration 'rise'"):
        parse_variants("rise")
    assert Schedule().milestones == (60, 120, 160) and Schedule().scaled(10).milestones == (
        3, 6, 8)


def tiny_data():
    d = load_digits32()
    d.train_x, d.train_y = d.train_x[:48], d.train_y[:48]
    d.test_x, d.test_y = d.test_x[:16], d.test_y[:16]
    return d


def test_a_killed_configuration_resumes_to_the_same_weights(tmp_path):
    data = tiny_data()
    teacher = small_wrn()
    maps = torch.rand(48, 32, 32, generator=torch.Generator().manual_seed(0))
    schedule = Schedule(epochs=3, milestones=(2,), batch_size=16)
    v = Variant("shapcam", True)

    def student():
        torch.manual_seed(1)
        return wrn("wrn-10-1")

    whole = student()
    h1 = train_student(whole, teacher, data, v, schedule, Checkpoint(tmp_path / "a.pt"),
                       teacher_maps=maps)
    part = student()
    train_student(part, teacher, data, v, schedule, Checkpoint(tmp_path / "b.pt"),
                  teacher_maps=maps, stop_after=1)  # "killed" after its first epoch
    assert torch.load(tmp_path / "b.pt", weights_only=False)["epoch"] == 0
    resumed = student()  # a new process: fresh weights, then the checkpoint
    h2 = train_student(resumed, teacher, data, v, schedule, Checkpoint(tmp_path / "b.pt"),
                       teacher_maps=maps)
    assert [r["epoch"] for r in h2] == [0, 1, 2]
    for p, q in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [r["test_error"] for r in h1] == [r["test_error"] for r in h2]
    # A finished configuration is not trained again.
    again = train_teacher(small_wrn(), data, schedule, Checkpoint(tmp_path / "b.pt"))
    assert [r["epoch"] for r in again] == [0, 1, 2]


def _cli(args: list[str], cwd: Path, api: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    if api is not None:  # a shared server (else the command starts its own)
        env["PREFECT_API_URL"] = api
    return subprocess.run([sys.executable, "-c", "from flows.cli import app; app()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_distill_flow_end_to_end(tmp_path, shared_api):
    write_cifar(tmp_path / "cifar", n=12)
    args = ["distill", "--dataset", "cifar10", "--root", str(tmp_path / "cifar"), "--epochs",
            "1", "--variants", "ce,shapcam+kd", "--batch-size", "16", "--workers", "2",
            "--store", str(tmp_path / "runs"), "--run-id", "t"]
    out = _cli(args, tmp_path, shared_api)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| cross-entropy only |" in out.stdout and "Prefect UI" in out.stdout
    from storage import open_run
    from tasks.training import distill_table

    run = tmp_path / "runs" / "t"
    df = open_run(run).training()
    assert sorted(df["config"]) == ["ce", "shapcam+kd", "teacher"]
    assert df["train_kd"].notna().sum() == 1 and df["train_interpret"].notna().sum() == 1
    table = distill_table(str(run), "t")
    cells = {r[0]: (r[1], r[2]) for r in table.rows}
    assert cells["cross-entropy only"][0] is not None and cells["cross-entropy only"][1] is None
    assert cells["+ Shap-CAM L_interpret"][1] is not None
    # A diverged student is reported as such (the flow records it and finishes the others).
    marked = distill_table(str(run), "t", {"shapcam+kd": "FloatingPointError: loss is nan"})
    assert marked.rows[-1][2] == "failed"
    from dashboards.render import markdown

    assert "shapcam+kd failed: FloatingPointError" in markdown(marked)
    assert (run / "teacher_maps" / "shapcam.npy").is_file()
    assert (run / "report.html").stat().st_size > 10_000
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    out = _cli(args, tmp_path, shared_api)  # the same run id: everything is done, nothing retrains
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == stamps


def write_voc(root: Path) -> Path:
    """A tiny VOC2007 made of the sample photos (real JPEGs), in the real layout."""
    from test_data import xml

    from shapcam.data.photos import bundled_photo

    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    items = [("000001", "chelsea", "cat"), ("000002", "coffee", "diningtable"),
             ("000003", "astronaut", "person"), ("000004", "rocket", "aeroplane")]
    for image_id, photo, cls in items:
        from PIL import Image

        with Image.open(bundled_photo(photo).path) as im:
            im = im.convert("RGB")
            im.save(voc / "JPEGImages" / f"{image_id}.jpg")
            w, h = im.size
        xml(voc / "Annotations" / f"{image_id}.xml", (w, h), [(cls, (1, 1, w - 2, h - 2))])
    ids = "\n".join(i for i, _, _ in items)
    for split in ("trainval", "test"):
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text(ids)
    return root / "VOCdevkit"


@pytest.mark.slow
@pytest.mark.real_weights
def test_finetune_voc_flow_and_its_weights_explain(mobilenet, tmp_path, shared_api):
    root = write_voc(tmp_path)
    out = _cli(["finetune-voc", "--root", str(root), "--model", "mobilenet_v2", "--weights",
                "IMAGENET1K_V1", "--epochs", "1", "--batch-size", "4", "--lr", "0.001",
                "--store", str(tmp_path / "runs"), "--run-id", "v"], tmp_path, shared_api)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "mAP on test" in out.stdout and "shapcam run --dataset voc" in out.stdout
    weights = tmp_path / "runs" / "v" / "mobilenet_v2_voc.pth"
    from shapcam import ShapCAM, load_model
    from shapcam.data import load_example, open_dataset

    lm = load_model("mobilenet_v2", str(weights))
    assert len(lm.categories) == 20 and lm.categories[14] == "person"
    rec = open_dataset("voc", root, "test")[2]
    x, _, _ = load_example(rec)
    result = ShapCAM(lm, permutations=8)(x[None], [14])
    assert result.maps.shape == (1, 224, 224) and torch.isfinite(result.raw).all()
    from storage import open_run

    row = open_run(tmp_path / "runs" / "v").training().iloc[-1]
    assert 0 <= row["test_map"] <= 100 and math.isfinite(row["train_bce"])
    shutil.rmtree(tmp_path / "runs")
