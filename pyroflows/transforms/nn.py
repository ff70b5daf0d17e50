"""Conditioner networks: one masked MLP serves coupling and autoregressive layers.

A conditioner maps the flow's input ``x`` (and an optional context) to the parameters of an
elementwise transformer. Which inputs each output may see is given by integer *ranks*
(MADE's degrees, Germain et al. 2015): output ``i`` depends on input ``j`` only if
``rank[j] < rank[i]``. Ranks ``0/1`` give a coupling layer; ranks ``1..D`` give an
autoregressive one. Inputs that no output may see are dropped before the first matmul and
all-ones masks are skipped, so a coupling conditioner costs exactly a dense MLP on the
conditioning half.

The output layer is zero-initialised: the conditioner then outputs zeros, and every
transformer in ``pyroflows.transforms.transformers`` is the identity at zero parameters,
so each layer starts as the exact identity (as in FlowJAX).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_HIDDEN_DIMS", "MaskedMLP", "contiguous_slice"]

DEFAULT_HIDDEN_DIMS = (64, 64)  # conditioner widths of every family unless told otherwise
FLAT_LIMIT = 2**18  # a conditioner's weights in one tensor up to this size (MaskedMLP)

_ACTIVATIONS = {
    "relu": nn.functional.relu,
    "elu": nn.functional.elu,
    "tanh": torch.tanh,
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
}


def contiguous_slice(index: Tensor) -> slice | None:
    """``slice(a, b)`` if ``index`` is ``a, a + 1, ..., b - 1``, else None."""
    if len(index) and torch.equal(index, torch.arange(int(index[0]), int(index[0]) + len(index))):
        return slice(int(index[0]), int(index[0]) + len(index))
    return None


class MaskedMLP(nn.Module):
    r"""A masked multilayer perceptron: ``x -> params`` with a rank-based dependency structure.

    Arguments:
        in_ranks: integer rank of each input dimension, shape ``(D,)``.
        out_ranks: rank of each output dimension, shape ``(N,)``; output ``i`` may depend on
            input ``j`` only if ``in_ranks[j] < out_ranks[i]``.
        params_per_output: number of parameters produced for each output dimension.
        hidden_dims: widths of the hidden layers.
        context_dim: size of an optional context vector every output may depend on.
        activation: one of ``relu``, ``elu``, ``tanh``, ``silu``, ``gelu``.

    The forward pass returns a tensor of shape ``(*batch, params_per_output, N)``: each
    parameter's values for all outputs are contiguous, which keeps elementwise transformers fast.

    Example:
        >>> net = MaskedMLP(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1]), 2, [8])
        >>> net(torch.randn(5, 4)).shape        # (batch, params per output, outputs)
        torch.Size([5, 2, 2])
        >>> net.used_inputs.tolist()     # a coupling conditioner reads only the first half
        [0, 1]
    """

    flat = True  # one parameter tensor (guides pickled before per-layer storage have it)

    def __init__(
        self,
        in_ranks: Tensor,
        out_ranks: Tensor,
        params_per_output: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        context_dim: int = 0,
        activation: str = "relu",
    ):
        super().__init__()
        in_ranks = torch.as_tensor(in_ranks, dtype=torch.long)
        out_ranks = torch.as_tensor(out_ranks, dtype=torch.long)
        if activation not in _ACTIVATIONS:
            choices = sorted(_ACTIVATIONS)
            raise ValueError(f"unknown activation {activation!r}; choose from {choices}")
        self.num_outputs = len(out_ranks)
        self.params_per_output = params_per_output
        self.context_dim = context_dim

        # Drop inputs that no output may depend on, when that saves much (a coupling half);
        # the one unused input of an autoregressive layer is cheaper masked than sliced away.
        max_out = int(out_ranks.max()) if len(out_ranks) else 0
        used = torch.nonzero(in_ranks < max_out).flatten()
        if len(used) > 0.75 * len(in_ranks):
            used = torch.arange(len(in_ranks))
        self.register_buffer("used_inputs", used)
        self.all_inputs_used = len(used) == len(in_ranks)
        # A contiguous block of inputs (the usual coupling half) is read as a view.
        self.used_slice = None if self.all_inputs_used else contiguous_slice(used)
        ranks = in_ranks[used]
        # Context features have rank -1: every unit may see them.
        ranks = torch.cat([ranks, torch.full((context_dim,), -1, dtype=torch.long)])

        # Hidden units spread evenly over the ranks of the used inputs (MADE's degrees); a layer
        # at least as wide as the number of ranks gives every rank a unit.
        levels = torch.unique(in_ranks[used]) if len(used) else torch.zeros(1, dtype=torch.long)
        if context_dim and len(out_ranks):
            # Units that see only the context, so that the lowest-rank outputs depend on it too.
            below = out_ranks.min().reshape(1) - 1
            levels = torch.unique(torch.cat([below, levels]))
        prev = ranks
        if len(prev) == 0:  # nothing to condition on (e.g. the first dimension): params are a bias
            hidden_dims = ()
        masks = []
        for width in hidden_dims:
            hidden = levels[torch.arange(width) * len(levels) // width]
            masks.append(prev[None, :] <= hidden[:, None])
            prev = hidden
        out = out_ranks.repeat(params_per_output)  # parameter-major: (P, N) after reshaping
        masks.append(prev[None, :] < out[:, None])

        # Up to FLAT_LIMIT elements, all weights and biases live in one flat parameter, read
        # through views: Pyro's optimizers step every parameter tensor separately (~60 us
        # each), so one tensor per conditioner instead of two per layer saves more per SVI
        # step than the whole spline costs. Above it, the flat parameter's gradient (one
        # concatenation of every layer's) costs more than that (at d = 1002, 0.65 ms of a 9 ms
        # step, benchmarks/RESULTS.md): each layer keeps its own weight and bias.
        self._activation = _ACTIVATIONS[activation]
        self._layers = []  # (out features, in features, mask buffer or None)
        chunks = []
        for k, mask in enumerate(masks):
            n_out, n_in = mask.shape
            bound = 1.0 / n_in**0.5 if n_in else 0.0  # nn.Linear's default initialisation
            last = k == len(masks) - 1
            weight = (
                torch.zeros(n_out, n_in)
                if last
                else torch.empty(n_out, n_in).uniform_(-bound, bound)
            )
            bias = torch.zeros(n_out) if last else torch.empty(n_out).uniform_(-bound, bound)
            name = None
            if not bool(mask.all()):  # an all-ones mask is skipped
                name = f"mask_{k}"
                self.register_buffer(name, mask.to(weight.dtype))
            self._layers.append((n_out, n_in, name))
            chunks += [weight.flatten(), bias]
        self._sizes = [len(c) for c in chunks]
        self.flat = sum(self._sizes) <= FLAT_LIMIT
        if self.flat:
            self.weights = nn.Parameter(torch.cat(chunks))
        else:
            for k in range(len(masks)):
                weight = chunks[2 * k].view(self._layers[k][:2])
                self.register_parameter(f"weight_{k}", nn.Parameter(weight))
                self.register_parameter(f"bias_{k}", nn.Parameter(chunks[2 * k + 1]))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.used_slice is not None:
            x = x[..., self.used_slice]
        elif not self.all_inputs_used:
            x = x.index_select(-1, self.used_inputs)
        if self.context_dim:
            if context is None:
                raise ValueError("this conditioner needs a context: call .condition(context)")
            shape = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
            x = torch.cat([x.expand(*shape, -1), context.expand(*shape, -1)], dim=-1)
        # One split, not a slice per tensor: its backward is a single concatenation, where
        # each slice's backward would fill a zero gradient the size of the whole parameter.
        pieces = self.weights.split(self._sizes) if self.flat else self._pieces()
        last = len(self._layers) - 1
        for k, (n_out, n_in, mask) in enumerate(self._layers):
            weight = pieces[2 * k].view(n_out, n_in)
            bias = pieces[2 * k + 1]
            if n_in == 0:
                x = bias.expand(*x.shape[:-1], n_out)
                continue
            if mask is not None:
                weight = weight * getattr(self, mask)
            x = nn.functional.linear(x, weight, bias)
            if k < last:
                x = self._activation(x)
        return x.unflatten(-1, (self.params_per_output, self.num_outputs))

    def _pieces(self) -> list[Tensor]:
        return [getattr(self, f"{kind}_{k}") for k in range(len(self._layers))
                for kind in ("weight", "bias")]

    def extra_repr(self) -> str:
        sizes = [n_in for _, n_in, _ in self._layers] + [self._layers[-1][0]]
        return f"sizes={sizes}, masked={[m is not None for *_, m in self._layers]}"
