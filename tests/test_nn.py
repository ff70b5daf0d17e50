import torch

from pyroflows.transforms.nn import MaskedMLP


def dependency(net, dim):
    """Which inputs each output's parameters depend on, from the Jacobian."""
    jac = torch.autograd.functional.jacobian(lambda x: net(x).sum(-2), torch.randn(dim))
    return jac.abs() > 0


def perturbed(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    return net


def test_autoregressive_masks_respect_ranks():
    ranks = torch.tensor([3, 1, 4, 2, 5])
    net = perturbed(MaskedMLP(ranks, ranks, 2, hidden_dims=[20, 20], activation="tanh"))
    allowed = ranks[None, :] < ranks[:, None]
    deps = dependency(net, 5)
    assert not (deps & ~allowed).any()  # never looks ahead
    assert deps[allowed].all()  # and sees everything it may (wide enough hidden layers)


def test_narrow_hidden_layers_still_respect_ranks():
    ranks = torch.arange(1, 21)
    net = perturbed(MaskedMLP(ranks, ranks, 1, hidden_dims=[4], activation="tanh"))
    deps = dependency(net, 20)
    assert not (deps & ~(ranks[None, :] < ranks[:, None])).any()
    assert deps[-1, :-1].sum() >= 4  # the last output still sees the spread of earlier inputs


def test_coupling_conditioner_is_dense_on_the_conditioning_half():
    net = MaskedMLP(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1, 1]), 3, hidden_dims=[8])
    assert net.used_inputs.tolist() == [0, 1, 2]
    assert not any(name.startswith("mask") for name, _ in net.named_buffers())


def test_zero_initialised_output_and_context():
    net = MaskedMLP(torch.arange(1, 4), torch.arange(1, 4), 2, hidden_dims=[8], context_dim=2)
    out = net(torch.randn(7, 3), torch.randn(2))
    assert out.shape == (7, 2, 3) and torch.equal(out, torch.zeros_like(out))
    perturbed(net)
    x = torch.randn(3)
    first = net(x, torch.zeros(2))[..., 0]
    assert not torch.allclose(
        first, net(x, torch.ones(2))[..., 0]
    )  # the first dim sees the context


def test_nothing_to_condition_on_gives_learnable_constants():
    net = MaskedMLP(torch.tensor([1]), torch.tensor([1]), 4, hidden_dims=[8])
    assert net(torch.randn(6, 1)).shape == (6, 4, 1)
    assert [(n, p.numel()) for n, p in net.named_parameters()] == [("weights", 4)]


def test_one_parameter_tensor_per_conditioner():
    net = MaskedMLP(torch.arange(1, 5), torch.arange(1, 5), 3, hidden_dims=[8, 8])
    (weights,) = net.parameters()
    assert weights.numel() == (3 * 8 + 8) + (8 * 8 + 8) + (8 * 12 + 12)


def test_a_large_conditioner_keeps_one_weight_and_bias_per_layer(monkeypatch):
    # Above FLAT_LIMIT elements the flat parameter's gradient (one concatenation) costs more
    # than per-tensor optimizer overhead saves; the network computed must be the same.
    ranks = torch.tensor([3, 1, 4, 2, 5])
    flat = perturbed(MaskedMLP(ranks, ranks, 2, hidden_dims=[20, 20], activation="tanh"))
    monkeypatch.setattr("pyroflows.transforms.nn.FLAT_LIMIT", 0)
    layered = MaskedMLP(ranks, ranks, 2, hidden_dims=[20, 20], activation="tanh")
    assert [n for n, _ in layered.named_parameters()] == [
        f"{kind}_{k}" for k in range(3) for kind in ("weight", "bias")
    ]
    with torch.no_grad():
        pieces = list(layered.parameters())
        values = flat.weights.split([piece.numel() for piece in pieces])
        for piece, value in zip(pieces, values, strict=True):
            piece.copy_(value.view_as(piece))
    x = torch.randn(7, 5)
    torch.testing.assert_close(layered(x), flat(x))
    perturbed(layered)
    assert not (dependency(layered, 5) & ~(ranks[None, :] < ranks[:, None])).any()
