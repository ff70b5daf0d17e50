"""pyroflows.adam and pyroflows.lbfgs: torch's arithmetic without torch.optim's classes."""

import math

import pytest
import torch

from pyroflows.adam import Adam
from pyroflows.lbfgs import minimise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [True, False])
def test_adam_takes_the_steps_torchs_adam_takes(dtype, fused):
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), ()]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kind = {"fused": True} if fused else {"foreach": True}
    reference = torch.optim.Adam(theirs, lr=0.03, **kind)
    optim = Adam(ours, lr=0.03)
    if not fused:  # parameters on a device without fused kernels take foreach's path
        optim.fused_devices = ()
    for step in range(25):
        lr = 0.03 * 0.9**step  # fit changes the rate between steps
        optim.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = lr
        target = torch.randn(4, dtype=dtype)
        for params in (ours, theirs):
            loss = sum((p.sin() * target.sum()).sum() for p in params) + sum(
                (p**2).sum() for p in params
            )
            loss.backward()
        optim.step()
        reference.step()
        for p in ours + theirs:
            p.grad = None
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.detach(), b.detach())
        assert not torch.equal(a.detach(), torch.zeros_like(a))


def test_adam_skips_parameters_without_a_gradient_and_refuses_non_leaves():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optim = Adam([a, b], lr=0.1)
    (a**2).sum().backward()
    optim.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in optim.state
    assert torch.allclose(a.detach(), torch.full((2,), 0.9))
    with pytest.raises(ValueError, match="floating-point leaves"):
        Adam([a * 2], lr=0.1)


def _torch_lbfgs(fn, x):
    u = x.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [u], lr=1.0, max_iter=150, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        optimizer.zero_grad()
        value = fn(u)
        value.backward()
        return value

    optimizer.step(closure)
    return u.detach()


def rosenbrock(x):
    return ((1 - x[:-1]) ** 2 + 100 * (x[1:] - x[:-1] ** 2) ** 2).sum()


def ill_conditioned(x):
    return (torch.logspace(0, 8, 8, dtype=x.dtype) * (x - 1) ** 2).sum()


def correlated(x):
    torch.manual_seed(1)
    a = torch.randn(len(x), len(x), dtype=x.dtype)
    return 0.5 * x @ (a @ a.T + 0.1 * torch.eye(len(x), dtype=x.dtype)) @ x - x.sum()


@pytest.mark.parametrize(
    "fn, start",
    [
        (rosenbrock, torch.full((10,), -1.0, dtype=torch.float64)),
        (ill_conditioned, torch.zeros(8, dtype=torch.float64)),
        (correlated, torch.zeros(30, dtype=torch.float64)),
    ],
)
def test_lbfgs_reaches_torchs_minimum_in_as_few_evaluations(fn, start):
    evaluations = []

    def counted(x):
        evaluations[-1] += 1
        return fn(x)

    evaluations.append(0)
    ours = minimise(counted, start)
    evaluations.append(0)
    theirs = _torch_lbfgs(counted, start)
    assert float(fn(ours)) <= float(fn(theirs)) + 1e-10
    assert torch.allclose(ours, theirs, atol=1e-5)
    # a line search that bisected where torch's accepts an end of the bracket once took
    # 2-15x torch's evaluations on a float32 energy (glm_poisson's Laplace search)
    assert evaluations[0] <= evaluations[1]
    assert torch.equal(start, torch.full_like(start, float(start[0])))  # start not written


def test_lbfgs_stops_where_a_rounded_energy_stops_changing():
    # an energy computed in float32 is flat within its rounding near the minimum; the
    # search must stop there, not spend its line searches on rounding noise
    def rounded(x):
        return ((x - 1) ** 2).sum().float().double() + 1e4

    evaluations = [0]

    def counted(x):
        evaluations[0] += 1
        return rounded(x)

    found = minimise(counted, torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(found, torch.ones(5, dtype=torch.float64), atol=1e-3)
    assert evaluations[0] <= 10


def test_lbfgs_shortens_a_step_into_non_finite_values():
    # -log(1 - x^2): finite only on (-1, 1); the first full step from 0.9 lands outside
    def barrier(x):
        return (-torch.log1p(-(x**2)) - 0.5 * x).sum()

    start = torch.tensor([0.9, -0.95], dtype=torch.float64)
    found = minimise(barrier, start)
    # the minimum solves 2x / (1 - x^2) = 0.5: x = 2 - sqrt(5) + ... ~= 0.2426
    expected = -2 + math.sqrt(5)
    assert torch.isfinite(found).all()
    assert torch.allclose(found, torch.full((2,), expected, dtype=torch.float64), atol=1e-6)
