"""Model loading, default layers, errors, and the trunk/head split."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from shapcam.errors import ShapCAMError
from shapcam.zoo.models import auto_target_layer, load_model
from shapcam.zoo.preprocessing import denormalize, normalize, preprocess_transform
from shapcam.zoo.split import split_model


@pytest.mark.parametrize("name, layer, shape", [
    ("vgg16", "features.29", (512, 14, 14)),
    ("resnet18", "layer4", (512, 7, 7)),
    ("mobilenet_v2", "features.18", (1280, 7, 7)),
])
def test_default_layers_and_exact_split(name, layer, shape):
    torch.manual_seed(0)
    lm = load_model(name, "random")
    assert lm.target_layer == layer
    x = torch.randn(2, 3, 224, 224)
    trunk, head = split_model(lm.model, layer)
    with torch.no_grad():
        features = trunk(x)
        assert tuple(features.shape[1:]) == shape
        torch.testing.assert_close(head(features), lm.model(x), rtol=1e-5, atol=1e-5)


def test_auto_target_layer_is_the_last_spatial_module():
    model = torchvision.models.efficientnet_b0(weights=None).eval()
    assert auto_target_layer(model) == "features"
    assert load_model("squeezenet1_1", "random").target_layer == auto_target_layer(
        torchvision.models.squeezenet1_1(weights=None).eval())


def test_unknown_model_lists_candidates():
    with pytest.raises(ShapCAMError, match="unknown model 'resnet181'.*resnet18"):
        load_model("resnet181", "random")


def test_unknown_weights_name_lists_the_enum():
    with pytest.raises(ShapCAMError, match="IMAGENET1K_V1"):
        load_model("resnet18", "IMAGENET9K")
    with pytest.raises(ShapCAMError, match="belong to another model"):
        load_model("resnet18", "MobileNet_V2_Weights.IMAGENET1K_V1")


def test_unknown_layer_suggests_close_names():
    with pytest.raises(ShapCAMError, match="layer 'layer5'.*layer4"):
        load_model("resnet18", "random", target_layer="layer5")


def test_weights_file_of_wrong_architecture(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ShapCAMError, match="does not fit architecture 'mobilenet_v2'"):
        load_model("mobilenet_v2", str(path))
    with pytest.raises(ShapCAMError, match="shape mismatches"):
        load_model("resnet18", str(path), num_classes=10)


def test_weights_file_round_trip_with_wrappers(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None, num_classes=7)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    lm = load_model("resnet18", str(path), num_classes=7)
    assert len(lm.categories) == 7
    torch.testing.assert_close(lm.model.fc.weight, model.fc.weight)


def test_unreadable_or_missing_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ShapCAMError, match="cannot read weights file"):
        load_model("resnet18", str(bad))
    with pytest.raises(ShapCAMError, match="does not exist"):
        load_model("resnet18", str(tmp_path / "missing.pth"))


def test_preprocessing_is_the_papers():
    from PIL import Image

    img = Image.new("RGB", (300, 100), (255, 0, 128))
    x = preprocess_transform()(img)
    assert x.shape == (3, 224, 224)  # resized without cropping
    back = denormalize(x.unsqueeze(0))[0]
    torch.testing.assert_close(back[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-3,
                               rtol=0)
    torch.testing.assert_close(normalize(back.unsqueeze(0))[0], x, atol=1e-3, rtol=0)


class DataDependent(nn.Module):
    """Not traceable by torch.fx (Python control flow on a tensor value)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=8, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.conv(x).relu()
        if a.sum() > 0:
            a = a * 2
        return self.fc(a.mean((2, 3)))


class SkipOverCut(nn.Module):
    """The input is used again after the target layer: no valid split there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((self.conv(x) + x).mean((2, 3)))


def test_untraceable_model_falls_back_exactly():
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="falling back"):
        trunk, head = split_model(model, "conv", check_input=x)
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(x)), model(x))


def test_split_over_a_skip_connection_is_refused():
    model = SkipOverCut().eval()
    with pytest.warns(UserWarning), pytest.raises(ShapCAMError, match="cannot be split"):
        split_model(model, "conv", check_input=torch.randn(1, 3, 16, 16))


def test_random_weights_are_the_same_in_every_process():
    """A run's workers each load "random" weights: they must build one model, and loading
    leaves the caller's random stream alone."""
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("resnet18", "random").model
    after = torch.rand(3)
    torch.manual_seed(999)
    b = load_model("resnet18", "random").model
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))


def test_torchvision_mobilenet_v3_is_not_given_timm_s_layer_of_the_same_class_name():
    from shapcam.zoo.models import load_model

    # timm's MobileNetV3 family layer is "blocks"; torchvision's class has the same name
    assert load_model("mobilenet_v3_small", "random").target_layer == "features"
