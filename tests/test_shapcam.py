"""ShapCAM end to end: analytic oracle, captum agreement, real photos, errors."""

from __future__ import annotations

import pytest
import torch

from shapcam import ShapCAM, ShapCAMError
from shapcam.data.photos import bundled_photo
from shapcam.methods.shapley import draw_orders
from shapcam.zoo.split import split_model


def additive_oracle(model, x, target):
    """GAP + FC with value=logit: v(S) = b + sum_{p in S} W_c a_p / n, so phi_p = W_c a_p / n."""
    with torch.no_grad():
        a = model.features(x)  # (B, C, h, w)
        n = a.shape[-1] * a.shape[-2]
        return torch.einsum("c,bchw->bhw", model.fc.weight[target], a) / n


@pytest.mark.parametrize("options", [
    dict(permutations=4),
    dict(permutations=4, antithetic=True),
    dict(permutations=4, fast_path="off"),
    dict(permutations=2, tolerance=1e-6, max_permutations=8),
])
def test_additive_head_gives_the_analytic_shapley_values(tiny, options):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = ShapCAM(tiny, "features", value="logit", **options)(x, targets=2)
    want = additive_oracle(tiny, x, 2)
    torch.testing.assert_close(result.raw, want, atol=1e-5, rtol=1e-4)
    assert result.maps.shape == (3, 64, 64)
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1


def test_exact_estimator_on_blocks_matches_the_oracle(tiny):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = ShapCAM(tiny, "features", value="logit", estimator="exact", block=2)(x, 0)
    assert result.extras["players"] == 16  # 8x8 map in 2x2 tiles
    want = additive_oracle(tiny, x, 0)
    tiles = want.view(1, 4, 2, 4, 2).sum((2, 4))  # a tile's Shapley value is its positions' sum
    got = result.raw.view(1, 4, 2, 4, 2)
    torch.testing.assert_close(got, (tiles / 4).view(1, 4, 1, 4, 1).expand_as(got),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.real_weights
def test_agrees_with_captum_shapley_value_sampling(mobilenet, photos):
    from captum.attr import ShapleyValueSampling

    x = photos["coffee"].unsqueeze(0)
    K, seed, target = 6, 11, 967
    cam = ShapCAM(mobilenet, permutations=K, seed=seed)
    ours = cam(x, target)
    trunk, head = split_model(mobilenet.model, mobilenet.target_layer)
    with torch.no_grad():
        features = trunk(x)
    h, w = features.shape[-2:]
    orders = draw_orders(torch.Generator().manual_seed(seed), K, h * w, antithetic=False)

    def forward(a):
        return head(a).softmax(1)[:, target]

    svs = ShapleyValueSampling(forward)
    svs.permutation_generator = lambda n, k: (o.tolist() for o in orders[:k])
    with torch.no_grad():
        theirs = svs.attribute(features, baselines=0.0, n_samples=K, perturbations_per_eval=49,
                               feature_mask=torch.arange(h * w).view(1, 1, h, w))
    torch.testing.assert_close(ours.raw[0], theirs[0, 0], atol=2e-6, rtol=1e-4)


@pytest.mark.real_weights
def test_efficiency_and_extras_on_a_real_head(mobilenet, photos):
    x = torch.stack([photos["chelsea"], photos["coffee"]])
    for options in [dict(permutations=8), dict(permutations=8, antithetic=True, block=2),
                    dict(estimator="exact", block=2), dict(permutations=8, baseline="mean")]:
        r = ShapCAM(mobilenet, **options)(x)
        ex = r.extras
        torch.testing.assert_close(r.raw.sum((1, 2)), ex["v_full"] - ex["v_empty"], atol=1e-5,
                                   rtol=1e-4)
        if options.get("baseline") != "mean":
            torch.testing.assert_close(ex["v_full"], r.probabilities, atol=1e-5, rtol=1e-4)
        assert ex["stderr"].shape == r.raw.shape and ex["fast_path"]
    r = ShapCAM(mobilenet, permutations=8)(x)
    assert r.extras["evaluations"].tolist() == [2 + 8 * 48] * 2
    assert r.extras["permutations"].tolist() == [8, 8] and r.extras["seed"].tolist() == [0, 0]


@pytest.mark.real_weights
def test_result_of_an_image_does_not_depend_on_its_batch(mobilenet, photos):
    cam = ShapCAM(mobilenet, permutations=16, batch_size=50)
    both = cam(torch.stack([photos["chelsea"], photos["coffee"]]), seeds=[3, 4])
    alone = cam(photos["coffee"].unsqueeze(0), seeds=[4])
    torch.testing.assert_close(both.raw[1], alone.raw[0], atol=1e-7, rtol=0)
    other = cam(photos["coffee"].unsqueeze(0), seeds=[5])
    assert not torch.allclose(other.raw[0], alone.raw[0])


def _energy_in_box(saliency: torch.Tensor, box, size) -> tuple[float, float]:
    """Energy-based pointing game on the 224x224 map; box in original pixels (x, y)."""
    width, height = size
    H, W = saliency.shape
    x0, y0 = int(box[0] * W / width), int(box[1] * H / height)
    x1, y1 = int(round(box[2] * W / width)), int(round(box[3] * H / height))
    inside = saliency[y0:y1, x0:x1].sum() / saliency.sum()  # rows are y, columns are x
    area = (y1 - y0) * (x1 - x0) / (H * W)
    return float(inside), area


@pytest.mark.real_weights
@pytest.mark.parametrize("photo, box, classes", [
    ("chelsea", "cat", range(281, 286)),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    ("coffee", "cup", (967, 968)),  # espresso, cup
])
def test_real_photos_put_the_energy_on_the_object(mobilenet, photos, photo, box, classes):
    from PIL import Image

    result = ShapCAM(mobilenet)(photos[photo].unsqueeze(0))
    assert int(result.targets[0]) in classes
    meta = bundled_photo(photo)
    size = Image.open(meta.path).size
    energy, area = _energy_in_box(result.maps[0], meta.boxes[box], size)
    assert energy > 0.5 and energy > area, (energy, area)
    ratio = result.extras["stderr"].abs().max() / result.raw.abs().max()
    assert ratio < 0.05  # the documented default K keeps error bars small


@pytest.mark.parametrize("x, message", [
    (torch.zeros(3, 64, 64), r"expected a batch of RGB images \(B, 3, H, W\), got \(3, 64, 64\)"),
    (torch.zeros(1, 1, 64, 64), "got \\(1, 1, 64, 64\\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float tensor"),
])
def test_wrong_input_shape(tiny, x, message):
    with pytest.raises(ShapCAMError, match=message):
        ShapCAM(tiny, "features", permutations=2)(x)


def test_target_out_of_range(tiny):
    with pytest.raises(ShapCAMError, match=r"target class 5 is out of range.*0\.\.4"):
        ShapCAM(tiny, "features", permutations=2)(torch.zeros(1, 3, 32, 32), targets=5)
    with pytest.raises(ShapCAMError, match="2 targets for a batch of 1"):
        ShapCAM(tiny, "features", permutations=2)(torch.zeros(1, 3, 32, 32), targets=[1, 2])


@pytest.mark.parametrize("options, message", [
    (dict(permutations=0), "permutations must be an integer >= 1, got 0"),
    (dict(permutations=3, antithetic=True), "even number of permutations, got 3"),
    (dict(value="prob"), "value='prob' is not one of probability, logit"),
    (dict(estimator="kernel"), "estimator='kernel'"),
])
def test_bad_options(tiny, options, message):
    with pytest.raises(ShapCAMError, match=message):
        ShapCAM(tiny, "features", **options)


def test_layer_that_does_not_exist(tiny):
    with pytest.raises(ShapCAMError, match="layer 'feature' does not exist.*features"):
        ShapCAM(tiny, "feature")


def test_plain_module_needs_a_layer(tiny):
    with pytest.raises(ShapCAMError, match="pass target_layer"):
        ShapCAM(tiny)


@pytest.mark.parametrize(("name", "weights"), [
    ("mobilenet_v2", "IMAGENET1K_V1"), ("mobilenet_v2", "random"), ("resnet18", "random"),
    ("resnet18", "IMAGENET1K_V1")])
@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_logit_shapcam_equals_gradcam_on_gap_fc_heads(name, weights, fast_path, photos,
                                                       request):
    """On GAP -> Linear heads the logit game is additive, ``phi_p = W_c . A_p / hw``, which is
    Grad-CAM's ``sum_k w_k A^k_p`` with ``w_k = W_ck / hw``: equal for any orders, so the only
    difference between Shap-CAM and Grad-CAM on these models is the paper's softmax."""
    from pathlib import Path

    from shapcam import GradCAM, load_model

    if name == "mobilenet_v2" and weights != "random":
        request.getfixturevalue("mobilenet")  # the offline weights of .ci/setup (or a skip)
    elif weights != "random" and not any((Path(torch.hub.get_dir()) / "checkpoints").glob(
            f"{name}-*.pth")):
        pytest.skip(f"{name} {weights} is not in the torch cache (.ci/setup installs only "
                    "MobileNetV2's weights)")
    torch.manual_seed(0)
    lm = load_model(name, weights)
    x = torch.stack(list(photos.values()))
    shap = ShapCAM(lm, value="logit", permutations=2, fast_path=fast_path)(x)
    gradcam = GradCAM(lm)
    grad = gradcam(x, shap.targets)
    with torch.no_grad():
        signed = torch.einsum("bc,bchw->bhw", grad.extras["weights"], gradcam.trunk(x))
    scale = float(signed.abs().max())
    torch.testing.assert_close(shap.raw, signed, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(shap.raw.clamp_min(0), grad.raw, atol=1e-5 * scale, rtol=1e-4)
