import pytest
import torch
from torch.distributions import biject_to, constraints

import pyroflows  # noqa: F401  (registers the bijections)


@pytest.mark.parametrize("constraint", [constraints.lower_cholesky, constraints.positive_definite])
@pytest.mark.parametrize("side", [1, 2, 4])
def test_bijection_log_det_and_inverse(constraint, side):
    t = biject_to(constraint)
    n = side * (side + 1) // 2
    x = torch.randn(n, dtype=torch.float64)
    y = t(x)
    assert constraint.check(y).all()
    assert torch.allclose(t.inv(y), x)
    rows, cols = torch.tril_indices(side, side)
    jac = torch.autograd.functional.jacobian(lambda v: t(v)[rows, cols], x)
    assert torch.allclose(t.log_abs_det_jacobian(x, y), torch.linalg.slogdet(jac)[1])
    assert t.inverse_shape(y.shape) == (n,) and t.forward_shape(x.shape) == (side, side)


def test_batched():
    t = biject_to(constraints.positive_definite)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = t(x)
    assert y.shape == (5, 2, 2) and t.log_abs_det_jacobian(x, y).shape == (5,)
