"""Evaluation metrics on hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from shapcam.errors import ShapCAMError
from shapcam.evaluation.metrics import (
    auc,
    average_drop,
    box_mask,
    causal_curves,
    confidence_metrics,
    deletion_insertion,
    energy_pointing_game,
    explanation_images,
    increase_in_confidence,
    keep_top_fraction,
    saliency_order,
)
from shapcam.zoo.preprocessing import denormalize, normalize


def test_average_drop_and_increase_by_hand():
    y = torch.tensor([0.8, 0.5, 0.2])
    o = torch.tensor([0.2, 0.5, 0.6])
    torch.testing.assert_close(average_drop(y, o), torch.tensor([75.0, 0.0, 0.0]))
    assert increase_in_confidence(y, o).tolist() == [False, False, True]


def test_keep_top_half_exactly():
    m = torch.tensor([[[0.1, 0.9], [0.5, 0.3]]])
    torch.testing.assert_close(keep_top_fraction(m), torch.tensor([[[0.0, 0.9], [0.5, 0.0]]]))
    flat = torch.full((1, 2, 3), 0.7)
    assert int((keep_top_fraction(flat) > 0).sum()) == 3  # ties: exactly half kept


def test_explanation_images_by_variant():
    x01 = torch.tensor([0.2, 0.4, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    x = normalize(x01)
    m = torch.tensor([[[1.0, 0.5], [0.25, 0.0]]])
    full = denormalize(explanation_images(x, m, "gradcampp"))
    torch.testing.assert_close(full, x01 * m.unsqueeze(1), atol=1e-6, rtol=0)
    top = denormalize(explanation_images(x, m, "scorecam"))
    torch.testing.assert_close(top, x01 * torch.tensor([[[1.0, 0.5], [0.0, 0.0]]]).unsqueeze(1),
                               atol=1e-6, rtol=0)
    with pytest.raises(ShapCAMError, match="unknown protocol variant 'paper'"):
        explanation_images(x, m, "paper")
    with pytest.raises(ShapCAMError, match="do not match images"):
        explanation_images(x, m[:, :1], "gradcampp")


class MeanBrightness(nn.Module):
    """p(class 0) = mean of the [0, 1] image (clamped away from 0 and 1)."""

    def forward(self, x):
        m = denormalize(x).mean((1, 2, 3)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([m.log(), (1 - m).log()], 1)


def test_confidence_metrics_end_to_end():
    x = normalize(torch.full((2, 3, 2, 2), 0.8))
    maps = torch.tensor([[[1.0, 1.0], [0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]]])
    res = confidence_metrics(MeanBrightness(), x, maps, torch.tensor([0, 0]), "gradcampp")
    torch.testing.assert_close(res["y"], torch.tensor([0.8, 0.8]), atol=1e-5, rtol=0)
    torch.testing.assert_close(res["o"], torch.tensor([0.6, 0.8]), atol=1e-5, rtol=0)
    torch.testing.assert_close(res["avg_drop"], torch.tensor([25.0, 0.0]), atol=1e-3, rtol=0)


def test_box_mask_is_not_transposed_for_a_non_square_box():
    # A wide box: x from 1 to 5 (4 px wide), y from 0 to 2 (2 px tall) on a 4 x 6 map.
    mask = box_mask(torch.tensor([[1.0, 0.0, 5.0, 2.0]]), height=4, width=6)
    assert mask.shape == (4, 6)
    assert mask.sum() == 8 and mask[:2, 1:5].all() and not mask[2:].any()
    assert not mask[:, 0].any() and not mask[:, 5].any()


def test_energy_pointing_game_by_hand():
    maps = torch.zeros(2, 4, 6)
    maps[0, 0, 1] = 3.0  # inside the box (x=1, y=0)
    maps[0, 3, 0] = 1.0  # outside
    maps[1, 1, 4] = 2.0  # inside the second image's two-box union
    boxes = [torch.tensor([[1.0, 0.0, 5.0, 2.0]]),
             torch.tensor([[0.0, 0.0, 1.0, 1.0], [4.0, 1.0, 5.0, 2.0]])]
    torch.testing.assert_close(energy_pointing_game(maps, boxes), torch.tensor([0.75, 1.0]))
    empty = energy_pointing_game(maps[:1], [torch.zeros(0, 4)])
    assert torch.isnan(empty).all()


def test_auc_trapezoid_by_hand():
    torch.testing.assert_close(auc(torch.tensor([1.0, 0.5, 0.0])), torch.tensor(0.5))
    torch.testing.assert_close(auc(torch.tensor([0.0, 1.0, 1.0])), torch.tensor(0.75))


def test_deletion_of_a_bright_image_is_linear():
    # All-white 4x4 image: p = fraction of pixels not yet deleted; 4 pixels per step.
    x = normalize(torch.ones(1, 3, 4, 4))
    maps = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    curve = causal_curves(MeanBrightness(), x, maps, torch.tensor([0]), "deletion", step=4,
                          batch_size=2)
    torch.testing.assert_close(curve[0], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), atol=1e-5,
                               rtol=0)
    res = deletion_insertion(MeanBrightness(), x, maps, torch.tensor([0]), step=4)
    torch.testing.assert_close(res["deletion"], torch.tensor([0.5]), atol=1e-5, rtol=0)


def test_deletion_follows_saliency_order():
    # Pixel brightness differs; the most salient pixel goes first.
    x01 = torch.zeros(1, 3, 1, 4)
    x01[..., 0, :] = torch.tensor([0.4, 0.0, 0.8, 0.0])
    maps = torch.tensor([[[0.5, 0.1, 0.9, 0.2]]])
    curve = causal_curves(MeanBrightness(), normalize(x01), maps, torch.tensor([0]), "deletion",
                          step=1)
    torch.testing.assert_close(curve[0], torch.tensor([0.3, 0.1, 0.0, 0.0, 0.0]), atol=1e-5,
                               rtol=0)
    ins = causal_curves(MeanBrightness(), normalize(x01), maps, torch.tensor([0]), "insertion",
                        step=1)
    assert ins.shape == (1, 5) and abs(float(ins[0, -1]) - 0.3) < 1e-5


def test_deletion_breaks_ties_at_random_not_row_by_row():
    """A map that is constant (0) over the right half of an 8x8 image whose right half is bright
    in its top rows and black in its bottom rows. Raster order would delete the bright rows of
    the plateau first; seeded random order deletes bright and black pixels alike, so averaged
    over seeds the curve falls linearly over the plateau (expected AUC 3/16)."""
    x01 = torch.zeros(1, 3, 8, 8)
    x01[..., :4, 4:] = 1.0  # right half: 16 bright pixels on top, 16 black below
    maps = torch.zeros(1, 8, 8)
    maps[0, :, :4] = 1 + torch.arange(32, dtype=torch.float32).view(8, 4)  # left: all distinct
    order = saliency_order(maps, 7)
    left = (torch.arange(64).view(8, 8)[:, :4]).flatten().flip(0)  # decreasing saliency
    assert torch.equal(order[0, :32], left), "distinct values are not taken in their order"
    assert torch.equal(order, saliency_order(maps, 7)), "not reproducible for one seed"
    assert not torch.equal(order[0, 32:], saliency_order(maps, 8)[0, 32:])
    assert not torch.equal(order[0, 32:], order[0, 32:].sort().values), "raster order"
    with pytest.raises(ShapCAMError, match="2 seeds for 1 maps"):
        saliency_order(maps, [1, 2])

    x = normalize(x01)
    model, target = MeanBrightness(), torch.tensor([0])
    aucs = [float(deletion_insertion(model, x, maps, target, step=4, seeds=[s])["deletion"])
            for s in range(24)]
    assert sum(aucs) / len(aucs) == pytest.approx(3 / 16, abs=0.01)
    # raster tie-breaking: the plateau's 16 bright pixels go in the first 4 of its 8 steps
    curve = [0.25] * 9 + [0.25 - k / 16 for k in range(1, 5)] + [0.0] * 4
    assert float(auc(torch.tensor(curve).clamp_min(1e-6))) == pytest.approx(2.5 / 16, abs=1e-3)
    assert abs(sum(aucs) / len(aucs) - 2.5 / 16) > 0.02  # the bias removed is measurable


def test_pointing_game_class_and_counts(tiny):
    """A misclassified image: with the explained class's box (the default) it has no box and is
    counted as left out; with ``pg_class="label"`` its label's box scores it."""
    import numpy as np

    from shapcam.data import ImageRecord
    from shapcam.evaluation.evaluate import score_maps, summary_table

    rec = ImageRecord("img", Path("img.jpg"), 1, boxes={1: np.array([[0, 0, 8, 8]], "f4")},
                      size=(32, 32), labels=(1,))
    maps = torch.zeros(1, 32, 32)
    maps[0, :8, :16] = 1.0  # half of the energy inside the label's box
    x, examples = torch.randn(1, 3, 32, 32), [(rec, {1: torch.tensor([[0.0, 0, 8, 8]])})]
    wrong = torch.tensor([3])
    (by_target,) = score_maps(tiny, x, maps, wrong, examples, "m", "scorecam", None, 0.0)
    assert by_target.pointing == "no box" and math.isnan(by_target.proportion)
    (by_label,) = score_maps(tiny, x, maps, wrong, examples, "m", "scorecam", None, 0.0,
                             pg_class="label")
    assert by_label.pointing == "scored" and by_label.proportion == pytest.approx(0.5)
    table = summary_table([by_target], ["m"])
    assert table["proportion_images"] == {"m": 0} and table["pointing_no_box"] == {"m": 1}
    with pytest.raises(ShapCAMError, match="pg_class must be one of target, label"):
        score_maps(tiny, x, maps, wrong, examples, "m", "scorecam", None, 0.0, pg_class="box")
