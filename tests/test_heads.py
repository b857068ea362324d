"""The exact fast paths equal the generic head path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shapcam import ShapCAM, load_model
from shapcam.methods.shapley import draw_orders, permutation_shapley
from shapcam.zoo.heads import analyse_head
from shapcam.zoo.split import split_model


def _features(lm, n_images=2, seed=0):
    torch.manual_seed(seed)
    trunk, _ = split_model(lm.model, lm.target_layer)
    with torch.no_grad():
        return trunk(torch.randn(n_images, 3, 224, 224))


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    lm = load_model("resnet18", "random")
    nn.init.normal_(lm.model.fc.weight, std=0.3)  # spread the random logits
    return lm


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return load_model("vgg16", "random")


def test_head_patterns_are_recognised(resnet18, vgg16, mobilenet):
    for lm, shape, pool, kernel, rest in [
        (resnet18, (512, 7, 7), "avg", (7, 7), False),
        (mobilenet, (1280, 7, 7), "avg", (7, 7), False),
        (vgg16, (512, 14, 14), "max", (2, 2), True),
    ]:
        _, head = split_model(lm.model, lm.target_layer)
        plan = analyse_head(head, shape)
        assert plan is not None and plan.pool == pool and plan.kernel == kernel
        assert (plan.rest is not None) == rest
    densenet = load_model("densenet121", "random")  # ReLU before the pooling: generic path
    _, head = split_model(densenet.model, densenet.target_layer)
    assert analyse_head(head, (1024, 7, 7)) is None


def _compare_paths(lm, features, *, block=None, baseline="zero", value="logit", K=3, atol=1e-4):
    fast = ShapCAM(lm, block=block, baseline=baseline, value=value, batch_size=97)
    slow = ShapCAM(lm, block=block, baseline=baseline, value=value, batch_size=97,
                   fast_path="off")
    targets = torch.tensor([3, 500])[: features.shape[0]]
    g_fast, g_slow = fast.game(features, targets), slow.game(features, targets)
    assert g_fast.plan is not None and g_slow.plan is None
    n = g_fast.n_players
    # Arbitrary coalitions, mixed images in one call.
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(40, n, generator=gen) < 0.5
    masks[0] = False
    masks[1] = True
    index = torch.arange(40) % features.shape[0]
    torch.testing.assert_close(g_fast(index, masks), g_slow(index, masks), atol=atol, rtol=1e-4)
    # All prefixes of random orders.
    for b in range(features.shape[0]):
        orders = draw_orders(gen, K, n, antithetic=False)
        ends = g_slow(torch.tensor([b, b]), torch.stack([masks[0], masks[1]]))
        got = g_fast.prefix_values([b], [orders], ends[:1].double(), ends[1:].double())[0]
        from shapcam.methods.shapley import _prefix_values_generic

        want = _prefix_values_generic(g_slow, [orders], [b], ends[:1].double().expand(2),
                                      ends[1:].double().expand(2), 97, torch.device("cpu"))[0]
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("block, baseline", [(None, "zero"), (None, "mean"), (2, "zero")])
def test_gap_fc_fast_path_equals_generic(resnet18, block, baseline):
    _compare_paths(resnet18, _features(resnet18), block=block, baseline=baseline)


@pytest.mark.parametrize("block, baseline", [(None, "zero"), (3, "mean")])
def test_vgg_maxpool_fast_path_equals_generic(vgg16, block, baseline):
    _compare_paths(vgg16, _features(vgg16, n_images=1), block=block, baseline=baseline, K=2,
                   atol=2e-4)


def test_probability_values_match_too(mobilenet, photos):
    trunk, _ = split_model(mobilenet.model, mobilenet.target_layer)
    with torch.no_grad():
        features = trunk(torch.stack([photos["chelsea"], photos["coffee"]]))
    _compare_paths(mobilenet, features, value="probability", atol=1e-6)


class AvgPoolMLP(nn.Module):
    """Non-global average pooling and a nonlinear rest: the generic additive-unit case."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=8, padding=1), nn.ReLU())
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.drop(torch.flatten(self.pool(self.features(x)),
                                                                    1)))))


def test_average_pooling_with_mlp_rest_equals_generic():
    torch.manual_seed(0)
    model = AvgPoolMLP().eval()
    x = torch.randn(2, 3, 64, 64)
    fast = ShapCAM(model, "features", permutations=8, value="logit")
    slow = ShapCAM(model, "features", permutations=8, value="logit", fast_path="off")
    a, b = fast(x, [0, 1]), slow(x, [0, 1])
    assert a.extras["fast_path"] and not b.extras["fast_path"]
    torch.testing.assert_close(a.raw, b.raw, atol=1e-5, rtol=1e-4)


def test_fast_and_generic_estimates_agree_end_to_end(resnet18):
    features = _features(resnet18)
    targets = torch.tensor([1, 2])
    fast = ShapCAM(resnet18, permutations=6, value="logit")
    slow = ShapCAM(resnet18, permutations=6, value="logit", fast_path="off")
    a = permutation_shapley(fast.game(features, targets), 6, seeds=[1, 2])
    b = permutation_shapley(slow.game(features, targets), 6, seeds=[1, 2])
    torch.testing.assert_close(a.phi, b.phi, atol=1e-4, rtol=1e-4)
