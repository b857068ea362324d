"""timm classifiers by ``timm:NAME``: families, split, fast path, normalisation, bad input."""

from __future__ import annotations

import pytest
import torch
from test_heads import _compare_paths, _features
from torch import nn
from typer.testing import CliRunner

from flows.cli import app
from shapcam import GradCAM, ShapCAM, load_model
from shapcam.data.photos import bundled_photo
from shapcam.errors import ShapCAMError
from shapcam.zoo.heads import analyse_head
from shapcam.zoo.models import ensure_weights
from shapcam.zoo.split import split_model
from tasks.config import ModelSpec

timm = pytest.importorskip("timm")

#: Tiny configurations timm ships for tests (random weights), and one small real family each.
FAMILIES = [  # (name, default layer, fast path)
    ("test_resnet", "layer4", True),
    ("test_efficientnet", "bn2", True),
    ("test_convnext", "stages", False),  # pool -> LayerNorm2d -> Linear: generic path
    ("regnetx_002", "s4", True),
    ("mobilenetv3_small_050", "blocks", False),  # pools before its 1x1 conv_head
]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: load_model(f"timm:{name}", "random") for name, _, _ in FAMILIES}


@pytest.mark.parametrize("name, layer, fast", FAMILIES)
def test_family_layer_split_and_fast_path(models, name, layer, fast):
    lm = models[name]
    assert lm.target_layer == layer and lm.name == f"timm:{name}"
    assert len(lm.categories) == 1000 and lm.weights == "random"
    x = torch.randn(2, 3, 224, 224)
    trunk, head = split_model(lm.model, layer, check_input=x)
    assert isinstance(trunk, torch.fx.GraphModule)  # traced, not the substitution fallback
    with torch.no_grad():
        features = trunk(x)
        torch.testing.assert_close(head(features), lm.model(x), atol=1e-5, rtol=1e-5)
    assert (analyse_head(head, tuple(features.shape[1:])) is not None) == fast


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_fast_path_equals_generic_on_timm_heads(models, name):
    lm = models[name]
    nn.init.normal_(lm.model.get_classifier().weight, std=0.3)  # spread the random logits
    _compare_paths(lm, _features(lm), value="probability", atol=1e-6)


def test_own_normalisation_is_applied_exactly(models):
    """test_resnet was trained with mean = std = 0.5: fed ImageNet-normalised input, the loaded
    model computes what timm's model computes on its own normalisation, keeps its names and
    state dict."""
    lm = models["test_resnet"]
    plain = timm.create_model("test_resnet", pretrained=False).eval()
    plain.load_state_dict(lm.model.state_dict())  # no extra keys: the affine is not saved
    x01 = torch.rand(2, 3, 224, 224)
    from shapcam.zoo.preprocessing import normalize

    with torch.no_grad():
        want = plain((x01 - 0.5) / 0.5)
        got = lm.model(normalize(x01))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert type(lm.model).__name__ == "ResNet" and isinstance(lm.model, type(plain))
    assert [n for n, _ in lm.model.named_modules()] == [n for n, _ in plain.named_modules()]
    imagenet = load_model("timm:test_efficientnet", "random").model  # ImageNet stats: untouched
    assert type(imagenet) is type(timm.create_model("test_efficientnet"))


def test_methods_run_on_timm_models(models):
    x = torch.randn(2, 3, 224, 224)
    for name in ("test_resnet", "test_convnext"):
        lm = models[name]
        for cam in (ShapCAM(lm, permutations=2), GradCAM(lm)):
            r = cam(x)
            assert r.maps.shape == (2, 224, 224) and float(r.maps.max()) == pytest.approx(1.0)
            if isinstance(cam, ShapCAM):  # efficiency: sum(phi) = v(full) - v(empty)
                total = r.extras["phi"].flatten(1).sum(1)
                gap = (r.extras["v_full"] - r.extras["v_empty"]).to(total.dtype)
                torch.testing.assert_close(total, gap, atol=1e-5, rtol=1e-4)


def test_model_spec_parses_timm_names():
    assert ModelSpec.parse("timm:resnet50.a1_in1k:random") == ModelSpec("timm:resnet50.a1_in1k",
                                                                        "random")
    assert ModelSpec.parse("timm:convnext_tiny").name == "timm:convnext_tiny"
    assert ModelSpec.parse("timm:x:/w/x.pth").weights == "/w/x.pth"


def test_state_dict_file_loads(models, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(models["test_efficientnet"].model.state_dict(), path)
    lm = load_model("timm:test_efficientnet", str(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), models["test_efficientnet"].model(x))
    with pytest.raises(ShapCAMError, match="does not fit architecture"):
        load_model("timm:test_resnet", str(path))


@pytest.mark.parametrize("name, weights, message", [
    ("timm:resnet5O", "random", r"unknown timm model 'resnet5O'; closest names: resnet50"),
    ("timm:", "random", "unknown timm model ''"),
    ("timm:eva02_tiny_patch14_224", "random", "Eva, a transformer whose"),
    ("timm:resnet18", "IMAGENET9", "unknown weights 'IMAGENET9' for timm:resnet18"),
])
def test_bad_timm_input_is_one_clear_line(name, weights, message):
    with pytest.raises(ShapCAMError, match=message) as info:
        load_model(name, weights)
    assert "\n" not in str(info.value)


def test_uncached_pretrained_weights_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    for call in (lambda: ensure_weights("timm:resnet18", "pretrained"),
                 lambda: load_model("timm:resnet18", "IMAGENET1K_V1")):
        with pytest.raises(ShapCAMError, match="cannot load timm:resnet18 pretrained weights: "
                           "not in the cache .*'random' weights") as info:
            call()
        assert "\n" not in str(info.value)


def test_cli_explain_with_a_timm_model(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(bundled_photo("chelsea").path), "--model",
                                   "timm:test_resnet", "--weights", "random",
                                   "--permutations", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "chelsea.shapcam.npz").is_file()
    res = CliRunner().invoke(app, ["explain", str(bundled_photo("chelsea").path), "--model",
                                   "timm:eva02_tiny_patch14_224", "--weights", "random"])
    assert res.exit_code != 0 and "Eva, a transformer" in res.output
    assert "Traceback" not in res.output
