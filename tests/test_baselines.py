"""Baselines: agreement with pytorch-grad-cam, direct-loop oracles, the shared contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shapcam import METHODS, GradCAM, GradCAMPlusPlus, ScoreCAM, load_model
from shapcam.methods.base import minmax
from shapcam.methods.perturbation import RISE, MeaningfulPerturbation


def _theirs(cls, model, layer, x, targets):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cls(model=model, target_layers=[layer])
    return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def _same_normalisation(raw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing: min-max at layer resolution, cv2 resize, min-max."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    return scale_cam_image(scale_cam_image(raw.clamp_min(0).cpu().numpy(), size))


@pytest.mark.real_weights
@pytest.mark.parametrize("ours_cls, theirs_name, options", [
    (GradCAM, "GradCAM", {}),
    (GradCAMPlusPlus, "GradCAMPlusPlus", {"eps": 1e-6}),
])
def test_agrees_with_pytorch_grad_cam_on_mobilenet(mobilenet, photos, ours_cls, theirs_name,
                                                   options):
    import pytorch_grad_cam

    x = torch.stack([photos["chelsea"], photos["coffee"]])
    ours = ours_cls(mobilenet, **options)(x)
    theirs = _theirs(getattr(pytorch_grad_cam, theirs_name), mobilenet.model,
                     mobilenet.model.features[18], x, ours.targets)
    np.testing.assert_allclose(_same_normalisation(ours.raw, (224, 224)), theirs, atol=2e-4)
    # and our own post-processing gives [0, 1] maps that differ only by resize-then-normalise
    assert float(np.abs(ours.maps.numpy() - theirs).mean()) < 0.02


def test_gradcam_agrees_on_resnet18_random():
    import pytorch_grad_cam

    torch.manual_seed(0)
    lm = load_model("resnet18", "random")
    x = torch.randn(2, 3, 224, 224)
    ours = GradCAM(lm)(x, [3, 7])
    theirs = _theirs(pytorch_grad_cam.GradCAM, lm.model, lm.model.layer4, x, [3, 7])
    np.testing.assert_allclose(_same_normalisation(ours.raw, (224, 224)), theirs, atol=2e-4)


def test_gradcampp_default_is_the_formula_without_eps(tiny):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cam = GradCAMPlusPlus(tiny, "features")
    with torch.no_grad():
        a = tiny.features(x)
    g = cam.gradients(a, torch.tensor([1]))
    alpha = g**2 / (2 * g**2 + a.sum((2, 3), keepdim=True) * g**3)
    alpha = torch.nan_to_num(alpha) * (g != 0)
    w = (alpha * g.clamp_min(0)).sum((2, 3))
    torch.testing.assert_close(cam.channel_weights(a, g), w)
    # GAP + FC: dy/dA = W_c / n everywhere, so Grad-CAM's weights are W_c / n.
    torch.testing.assert_close(GradCAM(tiny, "features").channel_weights(a, g)[0],
                               tiny.fc.weight[1] / 64)


def scorecam_reference(model, features, x, target):
    """Score-CAM by its definition, one channel at a time."""
    scores = []
    for k in range(features.shape[1]):
        act = features[0, k]
        if act.max() == act.min():
            scores.append(0.0)
            continue
        up = F.interpolate(act[None, None], size=x.shape[-2:], mode="bilinear",
                           align_corners=False)[0, 0]
        up = (up - up.min()) / (up.max() - up.min())
        with torch.no_grad():
            scores.append(model(x * up).softmax(1)[0, target].item())
    s = torch.tensor(scores)
    return torch.einsum("c,chw->hw", s, features[0]).clamp_min(0), s


def test_scorecam_matches_its_definition_and_skips_flat_channels(tiny):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiny.features[2].weight[3] = 0  # channel 3 becomes flat (ReLU of a bias)
        features = tiny.features(x)
    result = ScoreCAM(tiny, "features", batch_size=5)(x, [0, 4])
    for b, t in enumerate([0, 4]):
        want, scores = scorecam_reference(tiny, features[b:b + 1], x[b:b + 1], t)
        torch.testing.assert_close(result.raw[b], want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.extras["weights"][b], scores, atol=1e-6, rtol=1e-5)
    assert result.extras["weights"][:, 3].eq(0).all()
    assert result.extras["forward_passes"].tolist() == [7, 7]


def test_scorecam_max_channels_scores_only_the_most_varied_channels(tiny):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = tiny.features(x)
    full = ScoreCAM(tiny, "features", batch_size=5)(x, [0, 4])
    fast = ScoreCAM(tiny, "features", batch_size=5, max_channels=3)(x, [0, 4])
    assert fast.extras["forward_passes"].tolist() == [3, 3]
    for b in range(2):
        top = features[b].flatten(1).var(1).topk(3).indices
        kept = torch.zeros(features.shape[1], dtype=torch.bool)
        kept[top] = True
        # The kept channels have exactly the full method's weights, the others weight 0.
        torch.testing.assert_close(fast.extras["weights"][b][kept], full.extras["weights"][b][kept])
        assert fast.extras["weights"][b][~kept].eq(0).all()
    with pytest.raises(ValueError, match="max_channels"):
        ScoreCAM(tiny, "features", max_channels=0)


def test_rise_matches_its_definition(tiny):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    rise = RISE(tiny, "features", n_masks=20, grid=4, batch_size=7, seed=5)
    result = rise(x, [1, 2])
    masks = rise.masks(torch.arange(20), (32, 32))
    assert masks.shape == (20, 1, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    for b, t in enumerate([1, 2]):
        with torch.no_grad():
            p = tiny(x[b:b + 1] * masks).softmax(1)[:, t]
        want = torch.einsum("m,mhw->hw", p, masks[:, 0]) / (20 * 0.5)
        torch.testing.assert_close(result.raw[b], want, atol=1e-6, rtol=1e-5)
    again = RISE(tiny, "features", n_masks=20, grid=4, batch_size=3, seed=5)(x, [1, 2])
    torch.testing.assert_close(again.raw, result.raw, atol=1e-6, rtol=1e-5)


def test_mask_optimisation_deletes_evidence(tiny):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    method = MeaningfulPerturbation(tiny, "features", iterations=60, mask_size=8, lr=0.1)
    before = [p.detach().clone() for p in tiny.parameters()]
    result = method(x, 2)
    saliency = result.raw  # 1 - m
    assert saliency.shape == (1, 8, 8) and saliency.min() >= 0 and saliency.max() <= 1
    assert float(saliency.max()) > 0  # something was deleted
    for p, q in zip(tiny.parameters(), before, strict=True):
        assert torch.equal(p, q) and p.grad is None


@pytest.mark.parametrize("model_name", ["mobilenet_v2", "resnet18",
                                        pytest.param("vgg16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_every_model(model_name, method, request):
    if model_name == "mobilenet_v2":
        lm = request.getfixturevalue("mobilenet")
    else:
        torch.manual_seed(0)
        lm = load_model(model_name, "random")
    cheap = {"shapcam": {"permutations": 2}, "scorecam": {"batch_size": 256},
             "rise": {"n_masks": 16, "batch_size": 16}, "mask": {"iterations": 2}}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = METHODS[method](lm, **cheap.get(method, {}))(x)
    assert result.maps.shape == (2, 64, 64)
    assert torch.isfinite(result.maps).all() and torch.isfinite(result.raw).all()
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1
    assert result.maps.device == lm.device and result.targets.shape == (2,)


def test_minmax_of_a_constant_map_is_zero():
    m = minmax(torch.stack([torch.full((3, 3), 2.0), torch.arange(9.0).view(3, 3)]))
    assert m[0].eq(0).all() and m[1].min() == 0 and m[1].max() == 1


class _BNDropoutCNN(torch.nn.Module):
    """BatchNorm and dropout: a model whose outputs and buffers depend on its mode."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, stride=4, padding=1), torch.nn.BatchNorm2d(6),
            torch.nn.ReLU())
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)))


_CHEAP = {"mask": {"iterations": 3}, "rise": {"n_masks": 16}, "shapcam": {"permutations": 4}}


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_leave_the_callers_model_mode_alone(method):
    """Building or calling a method neither changes the caller's mode (a student explained
    inside its training step keeps training) nor moves BatchNorm statistics; the call itself
    explains the eval-mode model."""
    from shapcam.methods import build_method

    torch.manual_seed(0)
    model = _BNDropoutCNN()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()(x)  # running statistics away from their initial values
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    want = build_method(method, model, _CHEAP.get(method), "features")(x, [1, 2]).raw
    model.train()
    cam = build_method(method, model, _CHEAP.get(method), "features")
    assert all(m.training for m in model.modules()), "the constructor switched the mode"
    got = cam(x, [1, 2]).raw
    assert all(m.training for m in model.modules()), "the call did not restore the mode"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], msg=f"{k} changed")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    model.eval()
    cam(x, [1, 2])
    assert not any(m.training for m in model.modules()), "eval mode not restored"
