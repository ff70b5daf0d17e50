import pytest
import torch

from pyroflows.transforms.splines import spline_forward, spline_inverse, spline_knots

K = 6


def random_knots(shape=(50,), scale=2.0, bound=3.0, dtype=torch.float64):
    return spline_knots(
        scale * torch.randn(*shape, K, dtype=dtype),
        scale * torch.randn(*shape, K, dtype=dtype),
        scale * torch.randn(*shape, K - 1, dtype=dtype),
        bound=bound,
    )


def test_zero_parameters_give_the_identity():
    knots = spline_knots(torch.zeros(100, K), torch.zeros(100, K), torch.zeros(100, K - 1))
    x = torch.linspace(-5, 5, 100)
    y, ladj = spline_forward(x, knots)
    assert torch.allclose(y, x, atol=1e-6)
    assert torch.allclose(ladj, torch.zeros(100), atol=1e-6)


def test_knots_are_valid():
    knots = random_knots()
    assert torch.all(knots.xs[..., 1:] > knots.xs[..., :-1])
    assert torch.all(knots.ys[..., 1:] > knots.ys[..., :-1])
    assert torch.equal(knots.xs[..., 0], torch.full((50,), -3.0, dtype=torch.float64))
    assert torch.equal(knots.ys[..., -1], torch.full((50,), 3.0, dtype=torch.float64))
    assert torch.all(knots.derivatives > 0)
    assert torch.all(knots.derivatives[..., [0, -1]] == 1.0)  # linear tails


def test_monotone_and_log_derivative_matches_autograd():
    knots = random_knots()
    x = torch.linspace(-4.0, 4.0, 50, dtype=torch.float64, requires_grad=True)
    y, ladj = spline_forward(x, knots)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.all(grad > 0)
    assert torch.allclose(ladj, grad.log(), atol=1e-10)


def test_inverse_round_trip_and_log_det():
    knots = random_knots()
    x = 2.5 * torch.randn(50, dtype=torch.float64)
    y, ladj = spline_forward(x, knots)
    x_back, ladj_inv = spline_inverse(y, knots)
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.allclose(ladj_inv, -ladj, atol=1e-10)


def test_continuous_at_knots_and_bounds():
    knots = random_knots(shape=(1,))
    edges = torch.cat([knots.xs[0], torch.tensor([-3.0, 3.0], dtype=torch.float64)])
    eps = 1e-9
    below, _ = spline_forward((edges - eps)[:, None], knots)
    above, _ = spline_forward((edges + eps)[:, None], knots)
    assert torch.allclose(below, above, atol=1e-7)


@pytest.mark.parametrize("value", [1e6, -1e6, 3.0, -3.0, 1e30])
def test_float32_extremes_are_finite(value):
    knots = random_knots(shape=(1,), scale=50.0, dtype=torch.float32)
    x = torch.tensor([value], requires_grad=True)
    y, ladj = spline_forward(x, knots)
    (gx,) = torch.autograd.grad(y.sum() + ladj.sum(), x)
    x_back, ladj_inv = spline_inverse(y.detach(), knots)
    for t in (y, ladj, gx, x_back, ladj_inv):
        assert torch.isfinite(t).all()
