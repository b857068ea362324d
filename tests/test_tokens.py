"""Shap-CAM on vision transformers: the token game against exact enumeration, key masking
against removal from the sequence, the other methods through the patch grid."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from shapcam import GradCAM, ShapCAM, build_method, load_model
from shapcam.errors import ShapCAMError
from shapcam.zoo.models import LoadedModel

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def tiny_vit(pool: str, depth: int = 2) -> LoadedModel:
    """4 patch tokens (32 x 32 input, 16-pixel patches), 5 classes."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=depth, num_heads=2,
                            num_classes=5, global_pool=pool).eval()
    return LoadedModel(vit, "tiny-vit", "random", f"blocks.{depth - 2}",
                       [str(i) for i in range(5)])


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_key_mask_equals_removing_the_tokens(pool):
    cam = ShapCAM(tiny_vit(pool, depth=3), "blocks.0")  # two blocks after the split
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    present = torch.tensor([[True, False, True, False], [False, False, False, True],
                            [True, True, True, True]])
    with torch.no_grad():
        tokens = cam.trunk(x)
        torch.testing.assert_close(cam.head(tokens), cam.model(x), atol=1e-6, rtol=1e-6)
        masked = cam.head(tokens, present)
        for b in range(3):
            keep = [0] + [1 + i for i in range(4) if present[b, i]]
            torch.testing.assert_close(masked[b], cam.head(tokens[b:b + 1, keep])[0],
                                       atol=1e-6, rtol=1e-6)
        # a zeroed token is not an absent one: it still has a key and a value
        zeroed = tokens.clone()
        zeroed[0, 2] = 0
        assert not torch.allclose(cam.head(zeroed[:1]), masked[:1], atol=1e-4)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_token_shapcam_equals_exact_shapley_by_enumeration(pool):
    lm = tiny_vit(pool)
    cam = ShapCAM(lm, estimator="exact")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = cam(x)
    with torch.no_grad():
        tokens = cam.trunk(x)

    def v(b: int, coalition: set[int]) -> float:
        """The model on the sequence class token + coalition (the empty average pools to 0)."""
        with torch.no_grad():
            if not coalition and pool == "avg":
                logits = cam.head(tokens[b:b + 1], torch.zeros(1, 4, dtype=torch.bool))
            else:
                logits = cam.head(tokens[b:b + 1, [0] + [1 + i for i in sorted(coalition)]])
        return float(logits.softmax(1)[0, result.targets[b]])

    for b in range(2):
        phi = []
        for p in range(4):
            others = [q for q in range(4) if q != p]
            phi.append(sum(math.factorial(k) * math.factorial(3 - k) / math.factorial(4)
                           * (v(b, set(s) | {p}) - v(b, set(s)))
                           for k in range(4) for s in itertools.combinations(others, k)))
        torch.testing.assert_close(result.raw[b].flatten().double(),
                                   torch.tensor(phi, dtype=torch.float64), atol=1e-6, rtol=0)
        assert result.extras["v_full"][b] == pytest.approx(v(b, {0, 1, 2, 3}), abs=1e-6)
        assert result.extras["v_empty"][b] == pytest.approx(v(b, set()), abs=1e-6)
    assert result.raw.shape == (2, 2, 2) and result.maps.shape == (2, 32, 32)


def test_timm_vit_every_method_and_efficiency():
    lm = load_model("timm:test_vit", "random")
    assert lm.target_layer == "blocks.4"  # the tokens entering the last of 6 blocks
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    for name, options in [("gradcam", {}), ("gradcampp", {}), ("scorecam", {"max_channels": 4}),
                          ("rise", {"n_masks": 8}), ("shapcam", {"permutations": 2,
                                                                 "block": 2})]:
        cam = build_method(name, lm, options)
        r = cam(x)
        assert r.maps.shape == (2, 224, 224) and cam.feature_hw((224, 224)) == (14, 14)
        assert r.raw.shape == ((2, 14, 14) if name != "rise" else r.raw.shape)
        assert float(r.maps.max()) == pytest.approx(1.0)
        if name == "shapcam":  # efficiency: sum(phi) = v(full) - v(empty), 49 tiles of 2 x 2
            assert r.extras["players"] == 49
            gap = (r.extras["v_full"] - r.extras["v_empty"]).to(r.raw.dtype)
            torch.testing.assert_close(r.raw.flatten(1).sum(1), gap, atol=1e-5, rtol=1e-4)


def test_gradcam_on_tokens_is_gradcam_on_the_patch_grid():
    """Grad-CAM's weights are the mean gradient over the patch tokens only (not the class
    token), the map their weighted sum on the 2 x 2 grid."""
    lm = tiny_vit("token")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    cam = GradCAM(lm)
    r = cam(x)
    tokens = cam.trunk(x).detach().requires_grad_(True)
    cam.head(tokens)[0, r.targets[0]].backward()
    g, a = tokens.grad[0, 1:], tokens[0, 1:].detach()  # (4, D)
    want = (a @ g.mean(0)).clamp_min(0).view(2, 2)
    torch.testing.assert_close(r.raw[0], want, atol=1e-6, rtol=1e-5)


def test_bad_transformer_input_is_one_clear_line():
    lm = tiny_vit("token", depth=3)
    with pytest.raises(ShapCAMError, match=r"blocks.0 .. blocks.1 .*not 'head'"):
        GradCAM(lm, "head")
    with pytest.raises(ShapCAMError, match="baseline='mean' has no meaning for tokens"):
        ShapCAM(lm, baseline="mean")(torch.randn(1, 3, 32, 32))
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2,
                            num_classes=5, global_pool="map").eval()
    with pytest.raises(ShapCAMError, match="pools with 'map'; the token game supports token, "
                                           "avg"):
        GradCAM(LoadedModel(vit, "v", "random", "blocks.0", []))
    with pytest.raises(ShapCAMError, match="has a head of its own"):
        load_model("timm:deit_tiny_distilled_patch16_224", "random")
    with pytest.raises(ShapCAMError, match="Eva, a transformer whose tokens"):
        load_model("timm:eva02_tiny_patch14_224", "random")


def test_class_token_fast_path_equals_the_generic_path():
    lm = load_model("timm:test_vit", "random")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    fast, slow = ShapCAM(lm, permutations=2), ShapCAM(lm, permutations=2, fast_path="off")
    with torch.no_grad():
        tokens = fast.trunk(x)
        targets = fast.head(tokens).argmax(1)
    g_fast, g_slow = fast.game(tokens, targets), slow.game(tokens, targets)
    assert g_fast.fast and not g_slow.fast
    masks = torch.rand(30, 196, generator=torch.Generator().manual_seed(6)) < 0.5
    masks[0], masks[1] = False, True
    index = torch.arange(30) % 2
    torch.testing.assert_close(g_fast(index, masks), g_slow(index, masks), atol=1e-6, rtol=1e-5)
    a, b = fast(x), slow(x)
    assert a.extras["fast_path"] and not b.extras["fast_path"]
    torch.testing.assert_close(a.raw, b.raw, atol=1e-6, rtol=1e-4)
    # average pooling or an earlier split: the generic path (every block on the sequence)
    assert not ShapCAM(tiny_vit("avg")).game(torch.zeros(1, 5, 16), torch.zeros(1).long()).fast


def tiny_swin(window: int = 2) -> LoadedModel:
    """A 2-stage Swin on 16 x 16 inputs: its last stage is 2 x 2 tokens (4 players)."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer(img_size=16, patch_size=4, embed_dim=8, depths=(1, 2),
                           num_heads=(1, 2), window_size=window, num_classes=5).eval()
    return LoadedModel(swin, "tiny-swin", "random", "layers.1.blocks.0",
                       [str(i) for i in range(5)])


def test_swin_tokens_are_removed_from_attention_and_exact():
    lm = tiny_swin()
    cam = ShapCAM(lm, estimator="exact")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    present = torch.tensor([[True, False, True, False], [False, True, True, True]])
    with torch.no_grad():
        tokens = cam.trunk(x)  # NHWC
        assert tokens.shape == (2, 2, 2, 16)
        torch.testing.assert_close(cam.head(tokens), lm.model(x), atol=1e-6, rtol=1e-6)
        masked = cam.head(tokens, present)
        changed = tokens.clone().view(2, 4, 16)
        changed[~present] = torch.randn(int((~present).sum()), 16)  # absent tokens' content
        torch.testing.assert_close(cam.head(changed.view(2, 2, 2, 16), present), masked,
                                   atol=1e-6, rtol=1e-6)
        zeroed = tokens.clone().view(2, 4, 16)
        zeroed[~present] = 0
        assert not torch.allclose(cam.head(zeroed.view(2, 2, 2, 16)), masked, atol=1e-4)
    r = cam(x)
    gap = (r.extras["v_full"] - r.extras["v_empty"]).to(r.raw.dtype)
    torch.testing.assert_close(r.raw.flatten(1).sum(1), gap, atol=1e-6, rtol=1e-5)
    assert r.raw.shape == (2, 2, 2) and GradCAM(lm)(x).raw.shape == (2, 2, 2)
    swin = load_model("timm:swin_tiny_patch4_window7_224", "random")
    assert swin.target_layer == "layers.3.blocks.0"
    with pytest.raises(ShapCAMError, match="output of a block of its last stage"):
        GradCAM(swin, "layers.2.blocks.0")
    with pytest.raises(ShapCAMError, match="not one unshifted attention window"):
        GradCAM(tiny_swin(window=1))


def test_a_token_with_zero_attention_weight_changes_nothing_when_masked():
    """Literal form of "masking a token changes nothing when its attention weight is zero":
    one block after the split, class-token pooling, queries scaled by 1e4 so the class token's
    softmax gives exactly 0 (float32 underflow) to every key but each head's largest. Masking
    the zero-weight tokens leaves the logits bit-equal (generic and class-token paths);
    masking a weighted one does not."""
    lm = tiny_vit("token")
    blk = lm.model.blocks[1]
    dim = blk.attn.qkv.in_features
    with torch.no_grad():
        blk.attn.qkv.weight[:dim] *= 1e4  # the query rows
        blk.attn.qkv.bias[:dim] *= 1e4
    cam = ShapCAM(lm)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        tokens = cam.trunk(x)  # (1, 5, D): class token + 4 patches
        a = blk.attn
        B, N, _ = tokens.shape
        qkv = a.qkv(blk.norm1(tokens)).reshape(B, N, 3, a.num_heads, a.head_dim)
        q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
        weights = ((a.q_norm(q) * a.scale) @ a.k_norm(k).transpose(-2, -1)).softmax(-1)
        cls_weight = weights[0, :, 0, 1:]  # (heads, 4): the class token's query on the patches
        zero = (cls_weight == 0).all(0)
        assert 0 < int(zero.sum()) < 4, cls_weight  # some tokens weightless, some not
        full = cam.head(tokens)
        present = ~zero[None]
        assert torch.equal(cam.head(tokens, present), full)
        weighted = int(torch.nonzero(~zero)[0, 0])
        drop = torch.ones(1, 4, dtype=torch.bool)
        drop[0, weighted] = False
        assert not torch.allclose(cam.head(tokens, drop), full, atol=1e-4)
        game = cam.game(tokens, full.argmax(1))
        assert game.fast  # the class-token path agrees: same value with or without them
        both = torch.cat([torch.ones(1, 4, dtype=torch.bool), present])
        v = game(torch.zeros(2, dtype=torch.long), both)
        torch.testing.assert_close(v[0], v[1], atol=1e-6, rtol=0)
