"""The field metrics against hand computation, Quantus 0.6.0 and pytorch-grad-cam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from shapcam.errors import ShapCAMError
from shapcam.evaluation.field_metrics import (
    FIELD_METRICS,
    check_metrics,
    class_masks,
    complexity,
    linear_imputation,
    mprt_depths,
    mprt_scores,
    randomisable_layers,
    randomised_copy,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road,
    sparseness,
    spearman,
    ssim,
)

quantus = pytest.importorskip("quantus")


def _maps(b=3, h=16, w=16, seed=0):
    return torch.rand(b, h, w, generator=torch.Generator().manual_seed(seed))


def test_hand_cases():
    n = 16
    uniform, onehot, zero = torch.ones(1, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    onehot[0, 2, 1] = 0.7
    assert sparseness(uniform).item() == pytest.approx(0, abs=1e-7)
    assert sparseness(onehot).item() == pytest.approx((n - 1) / n)
    assert complexity(uniform).item() == pytest.approx(math.log(n))
    assert complexity(onehot).item() == pytest.approx(0, abs=1e-7)
    assert math.isnan(sparseness(zero).item()) and math.isnan(complexity(zero).item())
    # rank accuracy with a tie at the K-th value: map [1, 0, 0, 0], mask [0, 1, 1, 0], K = 2:
    # the top pixel misses; one of the three zeros is taken, 2 of 3 lie in the mask.
    a = torch.tensor([[[1.0, 0, 0, 0]]])
    s = torch.tensor([[[False, True, True, False]]])
    assert relevance_rank_accuracy(a, s).item() == pytest.approx((0 + 1 * 2 / 3) / 2)
    assert relevance_mass_accuracy(torch.tensor([[[0.5, 0.25, 0.25, 0]]]), s).item() == 0.5
    assert math.isnan(relevance_mass_accuracy(a, torch.zeros_like(s)).item())


def test_sparseness_and_complexity_equal_quantus():
    maps = _maps()
    x = np.zeros((3, 3, 16, 16), dtype=np.float32)
    a = maps.numpy()[:, None].copy()
    y = np.zeros(3, dtype=int)
    kw = dict(disable_warnings=True, display_progressbar=False)
    want_s = quantus.Sparseness(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a.copy())
    want_c = quantus.Complexity(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a.copy())
    # Quantus normalises by the max (ours are max-1 maps anyway) and adds 1e-7 / 1e-12.
    scaled = maps / maps.flatten(1).max(1).values.view(-1, 1, 1)
    np.testing.assert_allclose(sparseness(scaled).numpy(), want_s, atol=1e-5)
    np.testing.assert_allclose(complexity(scaled).numpy(), want_c, atol=1e-5)


def test_localisation_equals_quantus():
    maps = _maps(seed=1)
    boxes = [torch.tensor([[2.0, 3, 9, 12]]), torch.tensor([[0.0, 0, 5, 5], [10, 10, 16, 16]]),
             torch.tensor([[4.0, 4, 12, 8]])]
    masks = class_masks(boxes, 16, 16)
    x = np.zeros((3, 3, 16, 16), dtype=np.float32)
    a, s = maps.numpy()[:, None].copy(), masks.numpy()[:, None].astype(np.float32)
    kw = dict(disable_warnings=True, display_progressbar=False)
    y = np.zeros(3, dtype=int)
    rank = quantus.RelevanceRankAccuracy(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a.copy(),
                                               s_batch=s)
    mass = quantus.RelevanceMassAccuracy(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a.copy(),
                                               s_batch=s)
    scaled = maps / maps.flatten(1).max(1).values.view(-1, 1, 1)
    np.testing.assert_allclose(relevance_rank_accuracy(scaled, masks).numpy(), rank, atol=1e-6)
    np.testing.assert_allclose(relevance_mass_accuracy(scaled, masks).numpy(), mass, atol=1e-6)


def test_linear_imputation_equals_both_references_and_keeps_planes():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from quantus.functions.perturb_func import noisy_linear_imputation

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 12, 10, generator=gen)
    removed = torch.rand(12, 10, generator=gen) < 0.4
    ours = linear_imputation(x, removed)
    q = noisy_linear_imputation(x.numpy().copy(), np.flatnonzero(removed.numpy().ravel()),
                                noise=0.0)
    g = NoisyLinearImputer(noise=0.0)(x.clone(), (~removed).float())
    np.testing.assert_allclose(ours.numpy(), q, atol=1e-5)
    np.testing.assert_allclose(ours.numpy(), g.numpy(), atol=1e-5)
    assert torch.equal(ours[:, ~removed], x[:, ~removed])  # kept pixels untouched
    # a linear ramp is its own neighbour average away from the border: removed inner pixels
    # come back exactly
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(10.0), indexing="ij")
    ramp = (0.3 * rows - 0.2 * cols + 1).expand(2, -1, -1)
    inner = torch.zeros(12, 10, dtype=torch.bool)
    inner[3:9, 2:8] = torch.rand(6, 6, generator=gen) < 0.7
    torch.testing.assert_close(linear_imputation(ramp, inner), ramp, atol=1e-6, rtol=0)
    noisy = linear_imputation(x, removed, noise=0.01, generator=torch.Generator().manual_seed(0))
    diff = (noisy - ours)[:, removed]
    assert 0.005 < float(diff.std()) < 0.02 and torch.equal(noisy[:, ~removed], x[:, ~removed])


class OneChannel(nn.Module):
    """Logits linear in the pixels: imputing changes predictions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(100, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_road_equals_quantus():
    """Quantus 0.6.0's ROAD indexes pixels in a (C*H*W) order but imputes in (H*W): with 3
    channels and a 1-channel map it raises IndexError, so the comparison uses 1-channel images
    (our ROAD works on any channel count)."""
    torch.manual_seed(0)
    model = OneChannel().eval()
    x = torch.randn(4, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    maps = _maps(4, 10, 10, seed=4)
    with torch.no_grad():
        targets = model(x).argmax(1)
    percentages = [10, 30, 50, 70, 90]
    ours = road(model, x, maps, targets, percentages, noise=0.0)
    metric = quantus.ROAD(percentages=percentages, noise=0.0, normalise=False,
                          disable_warnings=True, display_progressbar=False)
    got = metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(),
                 a_batch=maps.numpy()[:, None].copy(), device="cpu")
    want = [got[p] for p in percentages]  # Quantus averages its booleans over the images
    np.testing.assert_allclose(ours["morf_kept"].float().mean(0).numpy(), want, atol=1e-6)
    assert ours["morf_kept"].float().mean(0).min() < 1  # removal changed some predictions
    lerf = ours["lerf_kept"].float().mean().item()
    assert ours["road_lerf"].mean().item() == pytest.approx(lerf)


def test_road_probability_equals_pytorch_grad_cam(tiny):
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    maps = _maps(2, 32, 32, seed=6)
    metric = ROADMostRelevantFirst(percentile=70)
    metric.perturbation.imputer.noise = 0.0
    with torch.no_grad():
        targets = tiny(x).argmax(1)
    diff = metric(x, maps.numpy(), [ClassifierOutputSoftmaxTarget(int(t)) for t in targets], tiny)
    for b in range(2):
        removed = maps[b].numpy() >= np.percentile(maps[b].numpy(), 70)
        filled = linear_imputation(x[b], torch.from_numpy(removed))
        with torch.no_grad():
            p0 = tiny(x[b:b + 1]).softmax(1)[0, targets[b]]
            p1 = tiny(filled[None]).softmax(1)[0, targets[b]]
        assert float(p1 - p0) == pytest.approx(float(diff[b]), abs=1e-5)


def test_randomised_copy_equals_quantus_cascade(tiny):
    from quantus.helpers.model.pytorch_model import PyTorchModel

    layers = randomisable_layers(tiny)
    assert layers == ["fc", "features.2", "features.0"]
    wrapped = PyTorchModel(tiny, channel_first=True, softmax=False, device="cpu")
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    for depth, (name, model) in enumerate(wrapped.get_random_layer_generator("top_down", 42), 1):
        ours = randomised_copy(tiny, depth, seed=42)
        assert name == layers[depth - 1]
        for k, v in model.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, atol=0, rtol=0)
    for k, v in tiny.state_dict().items():  # the original is untouched
        assert torch.equal(before[k], v)
    assert mprt_depths(3) == [1, 2, 3] and mprt_depths(62, (0.0, 1.0)) == [1, 62]


def test_mprt_spearman_equals_quantus(tiny):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = tiny(x).argmax(1)

    def explain(model, inputs, targets, **_):
        """|d logit / d input| summed over channels: never constant (Quantus's Spearman fails
        on constant maps, which ReLU'd CAMs of randomised models can be)."""
        inputs = torch.as_tensor(inputs).clone().requires_grad_(True)
        t = torch.as_tensor(targets).long()
        model(inputs).gather(1, t.view(-1, 1)).sum().backward()
        return inputs.grad.abs().sum(1, keepdim=True).numpy()

    a = explain(tiny, x, y)
    metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True,
                          display_progressbar=False)
    got = metric(model=tiny, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.copy(),
                 explain_func=explain, device="cpu")
    maps = torch.from_numpy(a[:, 0])
    for depth, layer in enumerate(randomisable_layers(tiny), 1):
        rnd = torch.from_numpy(explain(randomised_copy(tiny, depth, 42), x, y)[:, 0])
        np.testing.assert_allclose(spearman(maps, rnd).numpy(), got[layer], atol=1e-5)
    # SSIM as Quantus's function on the 2-D maps; identical maps score 1
    from quantus.functions.similarity_func import ssim as q_ssim

    rnd = torch.from_numpy(explain(randomised_copy(tiny, 3, 42), x, y)[:, 0])
    np.testing.assert_allclose(ssim(maps, rnd).numpy(),
                               [q_ssim(u, v) for u, v in zip(maps.numpy().astype(np.float64),
                                                             rnd.numpy().astype(np.float64),
                                                             strict=True)], atol=1e-6)
    same = mprt_scores(maps, [maps.clone()])
    assert torch.allclose(same["mprt_spearman"], torch.ones(3))
    assert torch.allclose(same["mprt_ssim"], torch.ones(3))


def test_mprt_counts_a_constant_randomised_map_in_both_columns():
    """A randomised model whose map is constant (Spearman undefined) is the strongest pass:
    it counts as 0 in the Spearman mean, over the same checkpoints as SSIM."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 8, 8, generator=g)
    noise = torch.rand(2, 8, 8, generator=g)
    flat = torch.zeros(2, 8, 8)
    got = mprt_scores(maps, [maps.clone(), noise, flat])
    rho = (1.0 + spearman(maps, noise) + 0.0) / 3
    sim = (ssim(maps, maps) + ssim(maps, noise) + ssim(maps, flat)) / 3
    torch.testing.assert_close(got["mprt_spearman"], rho.float())
    torch.testing.assert_close(got["mprt_ssim"], sim.float())
    assert not torch.isnan(ssim(maps, flat)).any()
    # a constant explanation has no ranking to test: NaN, not a pass
    const = mprt_scores(torch.ones(1, 8, 8), [noise[:1], flat[:1]])
    assert torch.isnan(const["mprt_spearman"]).all()


def test_the_library_checks_metric_names_as_the_cli_does(tmp_path):
    """``evaluate_records(metrics=...)`` as ``--metrics``: ``all`` computes every family, a
    misspelt name is an error (it used to compute nothing, silently)."""
    pytest.importorskip("timm")
    from shapcam import load_model
    from shapcam.data import draw_records, open_dataset
    from shapcam.evaluation.evaluate import evaluate_records

    lm = load_model("timm:test_resnet", "random")
    records = draw_records(open_dataset("sample", tmp_path / "data"), 1, 0)
    with pytest.raises(ShapCAMError, match="unknown metric 'sparsenes'"):
        evaluate_records(lm, records, ["gradcam"], causal=False, metrics=["sparsenes"])
    (row,) = evaluate_records(lm, records, ["gradcam"], causal=False, metrics=["all"])
    for column in ("sparseness", "complexity", "road_morf", "mprt_spearman", "mprt_ssim"):
        assert not math.isnan(getattr(row, column)), column


def test_bad_metric_names():
    assert check_metrics(["all"]) == ("sparseness", "complexity", "localisation", "road", "mprt")
    assert check_metrics(["road", "sparseness"]) == ("sparseness", "road")
    with pytest.raises(ShapCAMError, match="unknown metric 'ssim'; --metrics takes sparseness"):
        check_metrics(["ssim"])
    with pytest.raises(ShapCAMError, match="not a fraction"):
        mprt_depths(4, (2.0,))


@pytest.mark.slow
def test_pipeline_stores_the_field_metrics_like_the_plain_loop(tmp_path):
    """Through the pipeline's shards (maps written, then read back for the metrics) and the
    plain loop: the same field metrics, in the tables, the summary and SQL."""
    pytest.importorskip("timm")
    from test_pipeline import config_for, run_all

    from shapcam import load_model
    from shapcam.data import draw_records, open_dataset
    from shapcam.evaluation.evaluate import evaluate_records
    from storage import SaliencyStore, open_run

    model = {"name": "timm:test_resnet", "weights": "random", "layer": None}
    config = config_for(tmp_path / "data", n_images=2, shard_size=1, models=[model],
                        methods=["gradcam"], method_options={}, metrics=["all"],
                        pg_class="label")
    _, _, tables = run_all(tmp_path / "run", config)
    df = open_run(tmp_path / "run").metrics().set_index("image_id")
    records = draw_records(open_dataset("sample", tmp_path / "data"), 2, 0)
    lm = load_model("timm:test_resnet", "random")  # seeded: the run's weights
    plain = evaluate_records(lm, records, ["gradcam"], causal=False, metrics=config.metrics,
                             pg_class="label")
    columns = [c for cols in FIELD_METRICS.values() for c in cols]
    for row in plain:
        got = df.loc[row.image_id]
        for c in columns:
            want = getattr(row, c)
            assert (math.isnan(want) and (got[c] is None or math.isnan(got[c]))) or \
                got[c] == pytest.approx(want, abs=1e-5), c
    assert df["sparseness"].notna().all() and df["mass_accuracy"].notna().any()
    # recomputed from the stored maps
    maps = SaliencyStore(tmp_path / "run").read_shard("sample", "timm:test_resnet", "gradcam", 0)
    first = open_run(tmp_path / "run").metrics(filters=[("shard", "=", 0)]).iloc[0]
    assert first["sparseness"] == pytest.approx(
        float(sparseness(torch.from_numpy(maps.astype(np.float32)))[0]), abs=1e-6)
    labels = [r["metric"] for r in tables["timm:test_resnet"]["rows"]]
    assert "ROAD MoRF accuracy % (lower)" in labels and "MPRT SSIM (lower: passes the sanity " \
        "check)" in labels
    sql = open_run(tmp_path / "run").sql("select avg(road_lerf) as r, count(mprt_spearman) as n "
                                         "from metrics")
    assert int(sql["n"][0]) == 2 and 0 <= float(sql["r"][0]) <= 1
