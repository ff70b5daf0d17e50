"""The (x, y) memo must never hand back a stale result."""

import pyro.distributions as dist
import pytest
import torch

from pyroflows import transforms as T


@pytest.mark.parametrize("name", ["nsf", "iaf", "maf", "planar", "lu"])
def test_same_data_tensor_after_an_optimizer_step(name):
    flow = T.build(name, 3, num_layers=1)
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [flow])
    data = torch.randn(64, 3)
    optim = torch.optim.Adam(flow.parameters(), lr=0.1)
    if name == "planar":  # no inverse: score its own samples instead
        data = q.rsample((64,))
    for _ in range(3):
        optim.zero_grad()
        loss = -q.log_prob(data).mean()
        if name == "planar":
            assert loss.requires_grad
            break
        loss.backward()  # a stale memo would raise "backward through the graph a second time"
        optim.step()
    if name != "planar":
        fresh = -q.log_prob(data.clone()).mean()
        assert torch.allclose(-q.log_prob(data).mean(), fresh)


def test_memo_from_no_grad_is_not_used_for_training():
    flow = T.build("nsf", 3, num_layers=1, hidden_dims=[8])
    x = torch.randn(5, 3)
    with torch.no_grad():
        flow(x)
    y = flow(x)
    assert y.requires_grad


def test_memo_reused_when_nothing_changed():
    flow = T.build("iaf", 3, num_layers=1, hidden_dims=[8])
    x = torch.randn(5, 3)
    y = flow(x)
    assert flow(x) is y and flow.inv(y) is x
    x.add_(1.0)  # an in-place change of the input invalidates the memo
    assert flow(x) is not y
