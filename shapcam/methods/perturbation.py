"""Perturbation baselines: Score-CAM, RISE and Mask (meaningful perturbation).

Masks multiply the *normalised* input tensor, as the reference implementations of all three do
(so a masked-out pixel is the dataset mean colour). Every forward pass goes through the model in
batches of ``batch_size`` images, mixing channels/masks of several images in one batch; by
default 4 on CPU and 64 on GPU (:func:`shapcam.runtime.cpu.forward_batch`: small CPU batches avoid
the allocator's page faults and were 3-4x faster on 2 cores).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..evaluation.metrics import gaussian_blur
from ..runtime.cpu import forward_batch
from .base import CAMMethod, minmax


class ScoreCAM(CAMMethod):
    """Score-CAM (Wang et al., CVPR-W 2020).

    For each channel ``k``: ``M_k = minmax(upsample(A^k))``; ``s_k = softmax(f(x * M_k))[c]``;
    ``L = ReLU(sum_k s_k A^k)`` at layer resolution. Channels with a constant activation
    (``max == min``) carry no mask and get weight 0 without a forward pass.
    Cost: one forward pass per non-flat channel (C per image, plus the one shared with
    prediction), ``batch_size`` masked images per call.

    ``max_channels=N`` is the "Faster Score-CAM" approximation of tf-keras-vis (``max_N``): only
    the ``N`` channels of largest spatial variance are scored (the others get weight 0), so the
    cost drops to ``N`` forwards per image. ``None`` (the default) is the paper's definition.
    """

    name = "scorecam"
    title = "Score-CAM"

    def __init__(self, model, target_layer: str | None = None, *, batch_size: int | None = None,
                 max_channels: int | None = None) -> None:
        super().__init__(model, target_layer)
        if max_channels is not None and max_channels < 1:
            raise ValueError(f"max_channels must be >= 1 or None, got {max_channels}")
        self.batch_size, self.max_channels = batch_size, max_channels

    @torch.no_grad()
    def raw_maps(self, x: torch.Tensor, targets: torch.Tensor, *, features: torch.Tensor,
                 logits: torch.Tensor, **_: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        features = self.feature_map(features)  # ViT tokens: channels of the patch grid
        B, C, h, w = features.shape
        H, W = x.shape[-2:]
        flat = features.flatten(2)
        lo, hi = flat.amin(2), flat.amax(2)  # (B, C)
        live = (hi - lo) > 0
        if self.max_channels is not None and self.max_channels < C:
            var = flat.float().var(2).masked_fill(~live, -1.0)
            top = var.topk(self.max_channels, dim=1).indices
            live &= torch.zeros_like(live).scatter_(1, top, True)
        img_idx, ch_idx = torch.nonzero(live, as_tuple=True)
        scores = torch.zeros(B, C, device=x.device)
        bs = forward_batch(x.device, self.batch_size)
        for s in range(0, img_idx.numel(), bs):
            bi, ci = img_idx[s:s + bs], ch_idx[s:s + bs]
            act = features[bi, ci].unsqueeze(1)  # (m, 1, h, w)
            up = F.interpolate(act, size=(H, W), mode="bilinear", align_corners=False)
            up = minmax(up.squeeze(1)).unsqueeze(1)
            out = self.model(x[bi] * up)
            scores[bi, ci] = out.float().softmax(1).gather(1, targets[bi].view(-1, 1)).squeeze(1)
        cam = torch.einsum("bc,bchw->bhw", scores, features.float()).clamp_min(0)
        return cam, {"weights": scores, "forward_passes": live.sum(1)}


class RISE(CAMMethod):
    """RISE (Petsiuk et al., BMVC 2018): randomised input sampling.

    ``N`` binary masks on an ``s x s`` grid (keep probability ``p``) are upsampled bilinearly to
    ``(s + 1) * ceil(H / s)`` and cropped at a random shift; then
    ``L = sum_i softmax(f(x * M_i))[c] * M_i / (N * p)`` at input resolution.
    Masks come from ``seed`` (the same set for every image, as in the reference code).
    Cost: ``N`` forward passes per image (default 8000), ``batch_size`` per call.
    """

    name = "rise"
    title = "RISE"

    def __init__(self, model, target_layer: str | None = None, *, n_masks: int = 8000,
                 grid: int = 7, p_keep: float = 0.5, batch_size: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(model, target_layer)
        self.n_masks, self.grid, self.p_keep = n_masks, grid, p_keep
        self.batch_size, self.seed = batch_size, seed

    def raw_shape(self, feature_hw: tuple[int, int], input_hw: tuple[int, int]
                  ) -> tuple[int, int]:
        return input_hw

    def _grids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The seeded ``(N, 1, s, s)`` binary grids and per-mask shifts (small; cached)."""
        if not hasattr(self, "_grid_cache"):
            gen = torch.Generator().manual_seed(self.seed)
            s = self.grid
            grids = (torch.rand(self.n_masks, 1, s, s, generator=gen) < self.p_keep).float()
            shifts = torch.rand(self.n_masks, 2, generator=gen)  # fractions of a cell
            self._grid_cache = (grids.to(self.device), shifts[:, 0].to(self.device),
                                shifts[:, 1].to(self.device))
        return self._grid_cache

    def masks(self, index: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Masks ``index`` as ``(m, 1, H, W)`` in [0, 1], built on the fly (N full-size masks
        would take N * H * W floats: 1.6 GB for the default 8000 at 224 x 224)."""
        grids, fy, fx = self._grids()
        H, W = size
        s = self.grid
        cell_h, cell_w = -(-H // s), -(-W // s)  # ceil
        up = F.interpolate(grids[index], size=((s + 1) * cell_h, (s + 1) * cell_w),
                           mode="bilinear", align_corners=False)
        dy = (fy[index] * cell_h).long().view(-1, 1, 1)
        dx = (fx[index] * cell_w).long().view(-1, 1, 1)
        rows = dy + torch.arange(H, device=up.device).view(1, H, 1)
        cols = dx + torch.arange(W, device=up.device).view(1, 1, W)
        m = torch.arange(index.numel(), device=up.device).view(-1, 1, 1)
        return up[m, 0, rows, cols].unsqueeze(1).clamp_(0, 1)

    @torch.no_grad()
    def raw_maps(self, x: torch.Tensor, targets: torch.Tensor, *, features: torch.Tensor,
                 logits: torch.Tensor, **_: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        B, N = x.shape[0], self.n_masks
        size = tuple(x.shape[-2:])
        sal = torch.zeros(B, *size, device=x.device)
        # Masks are shared by all images: build each batch of masks once, pair it with every
        # image, and fill model batches of about batch_size.
        per = max(1, forward_batch(x.device, self.batch_size) // B)
        for s in range(0, N, per):
            idx = torch.arange(s, min(N, s + per), device=x.device)
            masks = self.masks(idx, size)  # (m, 1, H, W)
            m = masks.shape[0]
            batch = (x.unsqueeze(1) * masks.unsqueeze(0)).flatten(0, 1)  # (B * m, 3, H, W)
            probs = self.model(batch).float().softmax(1).view(B, m, -1)
            p = probs.gather(2, targets.view(B, 1, 1).expand(B, m, 1)).squeeze(2)  # (B, m)
            sal += torch.einsum("bm,mhw->bhw", p, masks[:, 0])
        sal /= N * self.p_keep
        return sal, {"forward_passes": torch.full((B,), N)}


class MeaningfulPerturbation(CAMMethod):
    """Mask / meaningful perturbation (Fong & Vedaldi, ICCV 2017), reference defaults.

    A ``mask_size x mask_size`` mask ``m`` (1 keeps, 0 deletes), upsampled bilinearly, blends the
    image with a blurred copy: ``x_m = x * m + blur(x) * (1 - m)`` (blur: Gaussian, kernel 11,
    sigma 5, as the reference PyTorch re-implementation; its per-iteration input noise is left
    out so results are deterministic). It is optimised with Adam to
    minimise ``l1 * mean|1 - m| + tv * mean(|grad m|^beta) + softmax(f(x_m))[c]``, ``m`` clamped
    to [0, 1] after each step, starting from all ones. The saliency is ``1 - m``.
    Cost: ``iterations`` forward + backward passes per image (batched over images).
    """

    name = "mask"
    title = "Mask"

    def __init__(self, model, target_layer: str | None = None, *, mask_size: int = 28,
                 lr: float = 0.1, iterations: int = 500, l1: float = 0.01, tv: float = 0.2,
                 beta: float = 3.0, blur_kernel: int = 11, blur_sigma: float = 5.0) -> None:
        super().__init__(model, target_layer)
        self.mask_size, self.lr, self.iterations = mask_size, lr, iterations
        self.l1, self.tv, self.beta = l1, tv, beta
        self.blur_kernel, self.blur_sigma = blur_kernel, blur_sigma

    def raw_shape(self, feature_hw: tuple[int, int], input_hw: tuple[int, int]
                  ) -> tuple[int, int]:
        return (self.mask_size, self.mask_size)

    def raw_maps(self, x: torch.Tensor, targets: torch.Tensor, *, features: torch.Tensor,
                 logits: torch.Tensor, **_: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        B = x.shape[0]
        blurred = gaussian_blur(x, self.blur_kernel, self.blur_sigma, border="reflect")
        m = torch.ones(B, 1, self.mask_size, self.mask_size, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([m], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.iterations):
                up = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
                xm = x * up + blurred * (1 - up)
                prob = self.model(xm).float().softmax(1).gather(1, targets.view(-1, 1))
                tv = ((m[..., 1:, :] - m[..., :-1, :]).abs().pow(self.beta).mean((1, 2, 3))
                      + (m[..., :, 1:] - m[..., :, :-1]).abs().pow(self.beta).mean((1, 2, 3)))
                # Images are independent: the sum's gradient is each image's own.
                loss = (self.l1 * (1 - m).abs().mean((1, 2, 3)) + self.tv * tv
                        + prob.squeeze(1)).sum()
                # Gradient w.r.t. the mask only: the model's parameters are left untouched.
                (m.grad,) = torch.autograd.grad(loss, m)
                opt.step()
                with torch.no_grad():
                    m.clamp_(0, 1)
        return (1 - m.detach())[:, 0], {"iterations": torch.full((B,), self.iterations)}
