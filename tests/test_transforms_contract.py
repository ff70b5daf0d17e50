"""The contract every registered flow keeps, checked on every name in the registry."""

import io

import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule

from pyroflows import transforms as T

ALL = T.available()
CONDITIONAL = [name for name in ALL if T.family(name).conditional]
SPLINES = ["nsf", "nsf_ar"]
SMALL = {"hidden_dims": [16, 16], "count_bins": 5, "hidden_factors": [4]}
DIM = 5


def make(name, dim=DIM, **kwargs):
    fam = T.family(name)
    arch = {k: v for k, v in SMALL.items() if k in fam.keywords}
    return T.build(name, dim, num_layers=2, **arch, **kwargs)


@torch.no_grad()
def perturb(module, scale=0.3):
    """Move every parameter away from its (identity) initialisation."""
    for p in module.parameters():
        p.add_(scale * torch.randn_like(p))
    return module


def jacobian_logdet(flow, x):
    """log|det J| from autograd, one point at a time (x: (N, D))."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.clone()), xi)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


@pytest.mark.parametrize("name", ALL)
def test_identity_at_construction(name):
    flow = make(name)
    x = torch.randn(64, DIM)
    y = flow(x)
    ladj = flow.log_abs_det_jacobian(x, y)
    if T.family(name).identity_init:
        assert torch.allclose(y, x, atol=1e-5), (y - x).abs().max()
        assert torch.allclose(ladj, torch.zeros_like(ladj), atol=1e-5)
    elif name == "bnaf":  # documented: within gate * |f(x) - x| of the identity
        assert (y - x).abs().mean() < 0.1
    else:  # permutations: volume preserving, not the identity
        assert torch.equal(ladj, torch.zeros_like(ladj))
        assert torch.equal(y.sort(-1).values, x.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_shape", [(), (4,), (3, 4)])
@pytest.mark.parametrize("name", ALL)
def test_shapes_and_finiteness(name, batch_shape, dtype):
    flow = perturb(make(name)).to(dtype)
    x = torch.randn(*batch_shape, DIM, dtype=dtype)
    y = flow(x)
    ladj = flow.log_abs_det_jacobian(x, y)
    assert y.shape == x.shape and y.dtype == dtype
    assert ladj.shape == batch_shape and ladj.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()


@pytest.mark.parametrize("dim", [1, 2, DIM])
@pytest.mark.parametrize("name", ALL)
def test_log_det_matches_autograd_jacobian(name, dim):
    flow = perturb(make(name, dim)).double()
    x = torch.randn(6, dim, dtype=torch.float64)
    y = flow(x)
    expected = jacobian_logdet(flow, x)
    assert torch.allclose(flow.log_abs_det_jacobian(x, y), expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_inverse(name):
    flow = perturb(make(name)).double()
    x = 3.0 * torch.randn(20, DIM, dtype=torch.float64)  # spline tails (|x| > 3) included
    y = flow(x)
    fresh = y.clone()  # a new tensor: the cache cannot answer, the inverse must be computed
    if T.family(name).analytic_inverse:
        x_back = flow.inv(fresh)
        assert torch.allclose(x_back, x, atol=1e-8), (x_back - x).abs().max()
        ladj_inv = flow.inv.log_abs_det_jacobian(fresh, x_back)
        assert torch.allclose(ladj_inv, -flow.log_abs_det_jacobian(x, y), atol=1e-8)
    else:
        assert flow.inv(y) is x  # its own sample is scored through the cache
        with pytest.raises(NotImplementedError, match="no analytic inverse"):
            flow.inv(fresh)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    flow = perturb(make(name))
    x = torch.randn(32, DIM, requires_grad=True)
    y = flow(x)
    loss = (y**2).sum() - flow.log_abs_det_jacobian(x, y).sum()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in flow.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name):
    flow = perturb(make(name))
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    torch.manual_seed(123)  # another seed: random inits and permutations differ
    other = make(name)
    x = torch.randn(8, DIM)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(other(x.clone()), flow(x.clone()))


@pytest.mark.parametrize("name", SPLINES)
def test_splines_finite_far_outside_the_interval(name):
    flow = perturb(make(name))
    x = torch.tensor(
        [[1e6, -1e6, 0.0, 1e6, -1e6], [3.0, -3.0, 2.999, -1e6, 1e-3]], requires_grad=True
    )
    y = flow(x)
    ladj = flow.log_abs_det_jacobian(x, y)
    (y.sum() + ladj.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters())
    # Fed +-1e6, the conditioner saturates the spline into extreme bins: the inverse must stay
    # finite (its precision is then limited by float32 itself, not checked here).
    x_back = flow.inv(y.detach().clone())
    assert torch.isfinite(x_back).all()


@pytest.mark.parametrize("context_shape", [(3,), (4, 3)])
@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_variant(name, context_shape):
    fam = T.family(name)
    arch = {k: v for k, v in SMALL.items() if k in fam.keywords}
    flow = perturb(T.build(name, DIM, num_layers=2, context_dim=3, **arch)).double()
    assert isinstance(flow, ConditionalTransformModule)
    context = torch.randn(context_shape, dtype=torch.float64)
    x = torch.randn(4, DIM, dtype=torch.float64)
    t = flow.condition(context)
    y = t(x)
    assert y.shape == (4, DIM)
    ladj = t.log_abs_det_jacobian(x, y)
    assert ladj.shape == (4,)
    # The context changes the map, and the map given a context is a proper flow.
    assert not torch.allclose(flow.condition(context + 1.0)(x.clone()), y)
    ctx_rows = context.expand(4, 3)
    for i in range(4):
        ti = flow.condition(ctx_rows[i])
        jac = torch.autograd.functional.jacobian(lambda v, ti=ti: ti(v.clone()), x[i])
        assert torch.allclose(ladj[i], torch.linalg.slogdet(jac)[1], atol=1e-8)
    assert torch.allclose(t.inv(y.clone()), x, atol=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_the_family_facts_agree_with_the_built_module(name):
    flow = make(name)
    assert T.invertible(flow) == T.family(name).analytic_inverse
    # "Mixes all pairs" shows in the Jacobian: every pair of dimensions is linked in one
    # direction at least (autoregressive layers are triangular); a coupling stack leaves pairs
    # within a half unlinked. Planar and radial layers link every pair, but each only by a
    # rank-one update, which cannot carry a correlation matrix: they do not count as mixing.
    x = torch.randn(DIM, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: perturb(flow.double())(v.clone()), x)
    linked = bool(((jac.abs() + jac.T.abs()) > 1e-12).all())
    if T.mixes_all_pairs(flow):
        assert linked, jac
    elif name not in ("planar", "radial"):
        assert not linked, jac


@pytest.mark.parametrize("name", [n for n in ALL if T.family(n).analytic_inverse])
def test_default_stacks_at_trained_like_parameters_are_exact_up_to_their_conditioning(name):
    # With every parameter of a default stack moved by N(0, 0.3^2), spline stacks reach
    # Jacobians with singular values of 1e-17 (condition numbers of 1e18): no float64
    # inverse can be better than eps |y| / sigma_min there. Each block is exact; the stack's
    # error must stay within a small multiple of that rounding bound, and its log-det must
    # match autograd wherever autograd's own reference is well conditioned.
    torch.manual_seed(1)
    flow = perturb(T.build(name, DIM).double())
    x = torch.randn(20, DIM, dtype=torch.float64)
    y = flow(x)
    x_back = flow.inv(y.clone())
    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: flow(v.clone()), xi) for xi in x]
    )
    sv = torch.linalg.svdvals(jac)
    rounding = torch.finfo(torch.float64).eps * y.abs().amax(-1).clamp(min=1.0) / sv[:, -1]
    assert ((x_back - x).abs().amax(-1) <= 100 * rounding + 1e-9).all()
    well = sv[:, 0] / sv[:, -1] < 1e8
    assert well.any()
    log_det = flow.log_abs_det_jacobian(x, y)
    reference = torch.linalg.slogdet(jac)[1]
    assert torch.allclose(log_det[well], reference[well], atol=1e-6, rtol=1e-8)
