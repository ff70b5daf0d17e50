"""A traced ATen graph, made lean and called through Python's fast tensor bindings.

``trace`` is how ``pyroflows.compiled`` and ``pyroflows.traced`` record a function: ``make_fx``
with one shared fake-tensor mode for the nodes' shape metadata (in real tracing mode torch
builds a new fake mode, with a stack trace, for every node: 0.83 -> 0.57 s to compile the d =
1002 step), then ``simplify`` and ``call_through_bindings``.

``make_fx`` records every operation as an ATen overload (``aten.mul.Tensor``), and an FX
graph calls each one through the overload's boxed dispatcher: 4.9 us for a scalar multiply,
where ``a * b`` takes 2.0 us (torch 2.13, one thread). At the sizes of most Bayesian models
that call overhead is most of the compiled step, so the most frequent overloads are called
through the operator or ``Tensor`` method that runs the same ATen kernel with the same
arguments. Outputs are bit-identical, and ``pyroflows.compiled`` checks the rewritten graph
against Pyro's general path before using it. Measured on the compiled step (1 thread):
centred eight schools 4.55 -> 3.61 ms, GARCH(1,1) 56.8 -> 37.0 ms, d = 1002 hierarchical
normal 8.15 -> 7.08 ms (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, fx
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["call_through_bindings", "simplify", "trace"]

aten = torch.ops.aten

# overload -> (the same computation through a fast binding, the overload's positional arity).
# Only calls with exactly that many positional arguments and no keywords are rewritten, so
# defaulted arguments such as ``add.Scalar``'s alpha are never dropped or reordered.
FAST_CALLS = {
    aten.add.Tensor: (operator.add, 2),
    aten.add.Scalar: (operator.add, 2),
    aten.sub.Tensor: (operator.sub, 2),
    aten.sub.Scalar: (operator.sub, 2),
    aten.mul.Tensor: (operator.mul, 2),
    aten.mul.Scalar: (operator.mul, 2),
    aten.div.Tensor: (operator.truediv, 2),
    aten.div.Scalar: (operator.truediv, 2),
    aten.pow.Tensor_Scalar: (operator.pow, 2),
    aten.pow.Tensor_Tensor: (operator.pow, 2),
    aten.neg.default: (operator.neg, 1),
    aten.exp.default: (Tensor.exp, 1),
    aten.log.default: (Tensor.log, 1),
    aten.sqrt.default: (Tensor.sqrt, 1),
    aten.detach.default: (Tensor.detach, 1),
    aten.t.default: (Tensor.t, 1),
    aten.view.default: (Tensor.view, 2),
    aten.expand.default: (Tensor.expand, 2),
    aten.select.int: (Tensor.select, 3),
    aten.sum.default: (Tensor.sum, 1),
    aten.sum.dim_IntList: (Tensor.sum, 2),
    aten.mm.default: (Tensor.mm, 2),
    aten.addmm.default: (Tensor.addmm, 3),
}


def call_through_bindings(graph: fx.GraphModule) -> int:
    """Rewrite ``graph``'s most frequent ATen calls to their fast bindings, in place; returns
    how many calls were rewritten.

    Example:
        >>> import torch
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> graph = make_fx(lambda x: (x * 2.0 + x).sum())(torch.ones(3))
        >>> call_through_bindings(graph)
        3
        >>> graph(torch.ones(3))
        tensor(9.)
    """
    rewritten = 0
    for node in graph.graph.nodes:
        fast = FAST_CALLS.get(node.target) if node.op == "call_function" else None
        if fast is None or node.kwargs or len(node.args) != fast[1]:
            continue
        node.target = fast[0]
        rewritten += 1
    if rewritten:
        graph.recompile()
    return rewritten


def trace(fn, *example: Tensor) -> fx.GraphModule:
    """``fn``'s ATen graph at ``example``, simplified and calling fast bindings. The graph is
    for calls under ``torch.no_grad()`` (``simplify`` drops its ``detach`` calls).

    Example:
        >>> import torch
        >>> graph = trace(lambda x: (x.detach() * torch.tensor(2.0).log()).sum(), torch.ones(3))
        >>> with torch.no_grad():
        ...     print(f"{float(graph(torch.ones(3))):.4f}")
        2.0794
    """
    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
        graph = make_fx(fn)(*example)
    simplify(graph)
    call_through_bindings(graph)
    return graph


IDENTITY_WHEN_SAME_SHAPE = {aten.view.default, aten.expand.default, aten.reshape.default}


def simplify(graph: fx.GraphModule) -> int:
    """Remove, in place, the calls of a traced graph that do nothing when it runs without
    gradients: ``detach``, a view or expand to the shape it already has, and computations on
    constants alone (folded once, here). Returns how many calls were removed.

    Constants are not folded in a graph that mutates any tensor in place, where a folded
    value could be changed by one call and seen by the next.

    Example:
        >>> import torch
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> graph = make_fx(lambda x: x.detach().view(3) * torch.tensor(4.0).sqrt())(torch.ones(3))
        >>> simplify(graph)
        4
        >>> graph(torch.ones(3))
        tensor([2., 2., 2.])
    """
    removed = 0
    nodes = graph.graph.nodes
    for node in list(nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.detach.default or (
            node.target in IDENTITY_WHEN_SAME_SHAPE and _same_shape(node, node.args[0])
        ):
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
            removed += 1
    if not any(_mutates(node) for node in nodes):
        removed += _fold_constants(graph)
    if removed:
        graph.graph.lint()
        graph.recompile()
    return removed


def _same_shape(node: fx.Node, source) -> bool:
    out, into = node.meta.get("val"), getattr(source, "meta", {}).get("val")
    return isinstance(out, Tensor) and isinstance(into, Tensor) and out.shape == into.shape


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _fold_constants(graph: fx.GraphModule) -> int:
    """Evaluate once every ATen call whose inputs are all constants (no placeholder, no
    random draw upstream); the values become attributes of the graph."""
    values = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            values[node] = getattr(graph, node.target)
        elif node.op == "call_function" and _pure(node.target) and all(
            n in values for n in node.all_input_nodes
        ):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
    before = _calls(graph)
    folded = 0
    for node, value in values.items():
        if node.op == "get_attr" or not isinstance(value, Tensor):
            continue
        if all(user in values for user in node.users):
            continue  # only feeds other folded calls: removed as dead code below
        name = f"_folded_{folded}"
        graph.register_buffer(name, value, persistent=False)
        with graph.graph.inserting_before(node):
            attribute = graph.graph.get_attr(name)
        node.replace_all_uses_with(attribute)
        folded += 1
    graph.graph.eliminate_dead_code()
    return before - _calls(graph)


def _calls(graph: fx.GraphModule) -> int:
    return sum(1 for node in graph.graph.nodes if node.op == "call_function")


def _pure(target) -> bool:
    """An ATen overload that draws nothing at random and mutates nothing."""
    tags = getattr(target, "tags", None)
    return (
        isinstance(target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded not in tags
        and not target._schema.is_mutable
    )
