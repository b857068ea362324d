"""Splitting a network at its target layer into a trunk (runs once) and a head (runs many times).

``head(trunk(x)) == model(x)``. The split uses :mod:`torch.fx` with the target layer kept as a
leaf, so containers such as ``resnet18.layer4`` or ``mobilenet_v2.features.18`` become one node.
It is valid only when nothing after the layer reads anything computed before it (no skip
connection across the split); otherwise, or when the model cannot be traced, the fallback
:class:`SubstitutionHead` re-runs the model with the layer's output replaced, which is exact but
recomputes the trunk on every head call (a warning says so).
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from ..errors import ShapCAMError
from .models import get_module


class _StopForwardError(Exception):
    pass


class _LeafTracer(fx.Tracer):
    """Default fx tracer that also keeps the target layer as one call_module node."""

    def __init__(self, leaf: str) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf or super().is_leaf_module(
            m, module_qualified_name)


class NotSplittableError(Exception):
    """The graph cannot be cut at this node into two single-input pieces."""


def graph_before(gm: fx.GraphModule, cut: fx.Node) -> fx.GraphModule:
    """The sub-graph of ``gm`` that computes ``cut`` (inputs of ``gm`` -> value of ``cut``)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is cut:
            break
    graph.output(env[cut])
    return _module(gm, graph, "Trunk")


def graph_after(gm: fx.GraphModule, cut: fx.Node, input_name: str = "features") -> fx.GraphModule:
    """The sub-graph of ``gm`` from the value of ``cut`` to the output.

    Raises :class:`NotSplittableError` when a node after ``cut`` reads a value computed before it
    (a skip connection over the cut, or the network input itself).
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    before: set[fx.Node] = set()
    seen_cut = False
    for node in gm.graph.nodes:
        if not seen_cut:
            if node is cut:
                seen_cut = True
                env[node] = graph.placeholder(input_name)
            else:
                before.add(node)
            continue
        for arg in node.all_input_nodes:
            if arg in before:
                if arg.op == "get_attr":  # parameters and buffers are fine to copy
                    env[arg] = graph.node_copy(arg, lambda n: env[n])
                    before.discard(arg)
                else:
                    raise NotSplittableError(f"node {node.name!r} after the cut reads {arg.name!r}")
        env[node] = graph.node_copy(node, lambda n: env[n])
    if not seen_cut:
        raise NotSplittableError(f"cut node {cut.name!r} is not in the graph")
    return _module(gm, graph, "Head")


def _module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    out = fx.GraphModule(root, graph, class_name=name)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def _trace(model: nn.Module, layer: str) -> tuple[fx.GraphModule, fx.Node]:
    tracer = _LeafTracer(layer)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise NotSplittableError(f"layer {layer!r} is called {len(calls)} times in the graph")
    return gm, calls[0]


class SubstitutionHead(nn.Module):
    """Fallback head: run ``model`` with ``layer``'s output replaced by the given features.

    Exact for any model whose computation after ``layer`` depends only on ``layer``'s output
    (checked numerically by :func:`split_model`), at the cost of a full forward per call.
    """

    def __init__(self, model: nn.Module, layer: str, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.layer = get_module(model, layer)
        self.input_shape = input_shape

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        handle = self.layer.register_forward_hook(lambda _m, _i, _o: features)
        try:
            x = torch.zeros((features.shape[0], *self.input_shape[1:]), device=features.device,
                            dtype=features.dtype)
            return self.model(x)
        finally:
            handle.remove()


class HookTrunk(nn.Module):
    """Fallback trunk: run ``model`` until ``layer`` returns, then stop."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer = get_module(model, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box: list[torch.Tensor] = []

        def hook(_m, _i, out):
            box.append(out)
            raise _StopForwardError

        handle = self.layer.register_forward_hook(hook)
        try:
            self.model(x)
        except _StopForwardError:
            pass
        finally:
            handle.remove()
        return box[0]


def split_model(
    model: nn.Module, layer: str, *, check_input: torch.Tensor | None = None,
    input_size: int = 224,
) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` at ``layer`` into ``(trunk, head)`` with ``head(trunk(x)) == model(x)``.

    Args:
        model: a network in eval mode.
        layer: dotted name of the module whose output is explained.
        check_input: optional batch on which ``head(trunk(x))`` is compared with ``model(x)``
            (always done for the fallback, with a small zero input when none is given).
        input_size: side of that zero input (the model's input frame).
    """
    get_module(model, layer)  # clear error for an unknown name
    try:
        gm, node = _trace(model, layer)
        trunk, head = graph_before(gm, node), graph_after(gm, node)
        fallback = False
    except (NotSplittableError, fx.proxy.TraceError, TypeError, NotImplementedError) as exc:
        warnings.warn(
            f"cannot split {type(model).__name__} at {layer!r} with torch.fx ({exc}); "
            "falling back to re-running the model with the layer output substituted, "
            "which recomputes the trunk on every head call", stacklevel=2)
        trunk, head = HookTrunk(model, layer), None
        fallback = True
    if fallback or check_input is not None:
        x = check_input
        if x is None:
            device = next(model.parameters()).device
            x = torch.zeros(1, 3, input_size, input_size, device=device)
        if fallback:
            head = SubstitutionHead(model, layer, tuple(x.shape))
        with torch.no_grad():
            want = model(x)
            got = head(trunk(x))
        if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
            raise ShapCAMError(
                f"{type(model).__name__} cannot be split at {layer!r}: the output after it "
                "depends on more than that layer's output (e.g. a skip connection); choose "
                "a layer at the end of a block")
    return trunk, head
