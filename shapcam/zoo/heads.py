"""Exact fast evaluation of a CNN head on masked feature maps.

Most classifier heads start with ``pool -> flatten -> Linear``. Then the first linear layer's
output on a masked map is a sum over *units* of the map,

    z(S) = b + sum_u  G[u, s_u(S)]

where a unit is one position when the pooling is an average (global average pooling of
ResNet/MobileNetV2 heads, or ``k x k`` average pooling) and one ``k x k`` cell when it is a max
pooling (VGG16's ``features.30``), and ``s_u(S)`` is which of the unit's positions are kept.
``G[u, s] = W_u @ pool_u(kept positions: A, others: baseline)`` is tabulated once per image
(``2^(k*k)`` subsets per max cell). Walking an order adds players one at a time, so the prefix
values are ``z_0 + cumsum`` of table differences: no convolution, pooling or first linear layer
per coalition. What follows the linear layer (``rest``: ReLU, more linear layers, or nothing for
GAP+FC heads) is evaluated on the prefixes in batches. Everything is exact (same arithmetic up to
float summation order) and tested against the generic head path.

:func:`analyse_head` recognises the pattern on a torch.fx head; anything else uses the generic
path (mask the features, run the head).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .split import graph_after

_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
#: Positions per max cell above which the 2^(k*k) subset table is not worth it.
_MAX_CELL_POSITIONS = 4


@dataclass
class CellLinearPlan:
    """``head = rest(linear(flatten(pool(A))))`` with ``pool`` average or max over k x k cells."""

    pool: str  # "avg" (additive: one unit per position) or "max" (one unit per k x k cell)
    kernel: tuple[int, int]  # pooling window on the feature map (h, w for global average)
    weight: torch.Tensor  # (out, C, ph, pw): linear weights per pooled channel and cell
    bias: torch.Tensor | None  # (out,)
    rest: nn.Module | None  # None when nothing non-trivial follows the linear layer
    _by_cell: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def weight_by_cell(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights as ``(U, C, out)`` contiguous blocks, one per pooled cell (cached).

        Built once per plan: the per-image tables are then batched matmuls over cells
        (VGG16: 49 x (16 x 512 @ 512 x 4096)) instead of a strided einsum.
        """
        if dtype not in self._by_cell:
            out, C = self.weight.shape[:2]
            self._by_cell[dtype] = (self.weight.to(dtype).reshape(out, C, -1)
                                    .permute(2, 1, 0).contiguous())
        return self._by_cell[dtype]


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = _module(gm, node)
    if isinstance(m, nn.Flatten):  # timm's SelectAdaptivePool2d(flatten=True)
        return m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1 and len(node.args) <= 2
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1 and len(node.args) <= 2
    return False


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _pool_of(gm: fx.GraphModule, node: fx.Node, hw: tuple[int, int]
             ) -> tuple[str, tuple[int, int]] | None:
    """Classify a pooling node on an ``hw`` map: ("avg"|"max"|"id", kernel) or None."""
    h, w = hw
    m = _module(gm, node)

    def adaptive(size) -> tuple[str, tuple[int, int]] | None:
        oh, ow = (size, size) if isinstance(size, int) else size
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            return None
        return ("id", (1, 1)) if (oh, ow) == (h, w) else ("avg", (h // oh, w // ow))

    def windowed(kind: str, k, s, p, extra_ok: bool) -> tuple[str, tuple[int, int]] | None:
        k = (k, k) if isinstance(k, int) else tuple(k)
        s = k if s is None or s == [] else ((s, s) if isinstance(s, int) else tuple(s))
        p = (p, p) if isinstance(p, int) else tuple(p)
        if s != k or p != (0, 0) or h % k[0] or w % k[1] or not extra_ok:
            return None
        return kind, k

    if isinstance(m, nn.AdaptiveAvgPool2d):
        return adaptive(m.output_size)
    if isinstance(m, nn.MaxPool2d):
        return windowed("max", m.kernel_size, m.stride, m.padding,
                        m.dilation in (1, (1, 1)) and not m.ceil_mode and not m.return_indices)
    if isinstance(m, nn.AvgPool2d):
        return windowed("avg", m.kernel_size, m.stride, m.padding,
                        not m.ceil_mode and m.divisor_override is None)
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return adaptive(size)
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = {d % 4 for d in dims} if isinstance(dims, list | tuple) else None
        if dims == {2, 3} and len(node.args) <= 3:
            return "avg", (h, w)
    return None


def analyse_head(head: nn.Module, feature_shape: tuple[int, int, int]) -> CellLinearPlan | None:
    """Recognise ``[pool] -> flatten -> Linear -> rest`` on an fx head, else ``None``.

    ``feature_shape`` is ``(C, h, w)`` of the map the head receives. Dropout and Identity
    modules are skipped (the model is in eval mode).
    """
    if not isinstance(head, fx.GraphModule):
        return None
    C, h, w = feature_shape
    nodes = list(head.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    node = placeholders[0]
    pool: tuple[str, tuple[int, int]] = ("id", (1, 1))
    pooled_hw = (h, w)
    flattened = False
    while True:
        users = list(node.users)
        if len(users) != 1 or users[0].op == "output":
            return None
        nxt = users[0]
        if nxt.all_input_nodes != [node] and not (
                nxt.op == "call_function" and nxt.target is operator.getitem):
            return None
        m = _module(head, nxt)
        if isinstance(m, _IDENTITY_MODULES):
            node = nxt
            continue
        found = None if flattened else _pool_of(head, nxt, pooled_hw)
        if found is not None and (found[0] == "id" or pool[0] == "id"):
            kind, k = found
            if kind != "id":  # one real pooling at most; identity-sized ones are skipped
                pool = found
                pooled_hw = (pooled_hw[0] // k[0], pooled_hw[1] // k[1])
            node = nxt
            continue
        if not flattened and _is_flatten(head, nxt):
            flattened = True
            node = nxt
            continue
        if flattened and isinstance(m, nn.Linear):
            if m.in_features != C * pooled_hw[0] * pooled_hw[1]:
                return None
            linear_node = nxt
            break
        return None
    kind, kernel = pool
    if kind == "max" and kernel[0] * kernel[1] > _MAX_CELL_POSITIONS:
        return None
    if kind == "id":  # flatten straight into the linear layer: additive per position
        kind, kernel = "avg", (1, 1)
    weight = m.weight.detach().view(m.out_features, C, *pooled_hw)
    bias = None if m.bias is None else m.bias.detach()
    rest = graph_after(head, linear_node, input_name="z")
    trivial = all(n.op in ("placeholder", "output")
                  or isinstance(_module(rest, n), _IDENTITY_MODULES) for n in rest.graph.nodes)
    return CellLinearPlan(kind, kernel, weight, bias, None if trivial else rest)


class CellLinearEvaluator:
    """Tables of one image's units for a :class:`CellLinearPlan` (see the module docstring)."""

    def __init__(self, plan: CellLinearPlan, features: torch.Tensor, baseline: torch.Tensor
                 ) -> None:
        """``features`` and ``baseline``: ``(C, h, w)`` of one image, on the plan's device."""
        self.plan = plan
        C, h, w = features.shape
        kh, kw = plan.kernel
        ph, pw = h // kh, w // kw
        out = plan.weight.shape[0]
        Wcell = plan.weight_by_cell(features.dtype)  # (U, C, out)
        positions = torch.arange(h * w, device=features.device).view(h, w)
        # Positions of each pooled cell, row-major over cells: (U, m) with m = kh * kw.
        cells = positions.view(ph, kh, pw, kw).permute(0, 2, 1, 3).reshape(ph * pw, kh * kw)
        m = kh * kw
        a = features.reshape(C, h * w)[:, cells]  # (C, U, m)
        base = baseline.expand(C, h, w).reshape(C, h * w)[:, cells]
        if plan.pool == "avg":
            # Additive: one unit per position, worth W_cell @ value / m, kept or at baseline.
            # Rows are put back in position order, so unit p is position p.
            self.unit_positions = positions.reshape(-1, 1)  # (n, 1)
            order = cells.reshape(-1)
            kept = torch.bmm(a.permute(1, 2, 0), Wcell).reshape(-1, out) / m
            if bool((base == 0).all()):  # the paper's zero baseline: nothing to multiply
                dropped = torch.zeros_like(kept)
            else:
                dropped = torch.bmm(base.permute(1, 2, 0), Wcell).reshape(-1, out) / m
            table = torch.empty(h * w, 2, out, dtype=kept.dtype, device=kept.device)
            table[order] = torch.stack([dropped, kept], dim=1)  # (n, 2, out)
        else:
            # One unit per k x k cell; tabulate the pooled vector for every subset of the cell.
            self.unit_positions = cells  # (U, m)
            subsets = (torch.arange(2**m, device=features.device).unsqueeze(1)
                       >> torch.arange(m, device=features.device)) & 1  # (2^m, m)
            vals = torch.where(subsets.bool().view(1, 1, 2**m, m), a.unsqueeze(2),
                               base.unsqueeze(2))  # (C, U, 2^m, m)
            pooled = vals.amax(-1)  # (C, U, 2^m)
            table = torch.bmm(pooled.permute(1, 2, 0), Wcell)  # (U, 2^m, out)
        self.table = table
        # Additive units: adding position p moves z by a fixed vector, whatever else is kept.
        self.additive = plan.pool == "avg"
        self.delta = table[:, 1] - table[:, 0] if self.additive else None  # (n, out)
        self.bit = (1 << torch.arange(self.unit_positions.shape[1], device=features.device))
        bias = plan.bias.to(table.dtype) if plan.bias is not None else torch.zeros(
            out, dtype=table.dtype, device=table.device)
        self.bias = bias
        self.z_empty = bias + table[:, 0].sum(0)  # all units at their baseline subset
        self.n_positions = h * w

    def _subsets(self, present: torch.Tensor) -> torch.Tensor:
        """``present (..., n_positions)`` bool -> subset code of every unit ``(..., U)``."""
        return (present[..., self.unit_positions].long() * self.bit).sum(-1)

    def logits_for(self, present: torch.Tensor) -> torch.Tensor:
        """First-linear outputs for arbitrary coalitions ``present (M, n_positions)``.

        A one-hot ``(M, U * 2^m)`` times the flattened table: one small matmul per batch.
        """
        codes = self._subsets(present)  # (M, U)
        U, S, out = self.table.shape
        onehot = torch.zeros(codes.shape[0], U * S, dtype=self.table.dtype, device=codes.device)
        onehot.scatter_(1, codes + S * torch.arange(U, device=codes.device), 1.0)
        return self.bias + onehot @ self.table.reshape(U * S, out)

    def prefix_logits(self, present: torch.Tensor) -> torch.Tensor:
        """First-linear outputs along orders: ``present (K, T, n_positions)`` must grow along T.

        Returns ``(K, T, out)``; computed as ``z_empty + cumsum`` of the table differences of
        the units that change between consecutive prefixes.
        """
        K, T, _ = present.shape
        codes = self._subsets(present)  # (K, T, U)
        prev = torch.cat([torch.zeros_like(codes[:, :1]), codes[:, :-1]], dim=1)
        k, t, u = torch.nonzero(codes != prev, as_tuple=True)
        delta = self.table[u, codes[k, t, u]] - self.table[u, prev[k, t, u]]  # (changes, out)
        out = torch.zeros(K * T, self.table.shape[-1], dtype=self.table.dtype,
                          device=self.table.device)
        out.index_add_(0, k * T + t, delta)
        return self.z_empty + out.view(K, T, -1).cumsum(1)
