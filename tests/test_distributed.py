"""Data-parallel fit over two gloo ranks equals a single-process full-data fit."""

import tempfile
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from pyroflows import AutoFlowGuide, distributed, fit

STEPS = 40


def logistic(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
    b = pyro.param("b", torch.zeros((), dtype=x.dtype))  # a model parameter, synced too
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1) + b), obs=y)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 3, generator=g, dtype=torch.float64)  # 101: unequal shards
    y = torch.bernoulli(
        torch.sigmoid(x @ torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)), generator=g
    )
    return x, y


def train(x, y, use_distributed):
    pyro.clear_param_store()
    # init="prior": the Laplace start of a rank sees only its shard (it is broadcast from
    # rank 0), so it differs from the full-data one the single process would compute
    guide = AutoFlowGuide(logistic, flow="realnvp", hidden_dims=[8], init="prior")
    result = fit(
        logistic,
        guide,
        x,
        y,
        num_steps=STEPS,
        seed=0,
        progress=False,
        diagnose=False,
        stop_early=False,
        distributed=use_distributed,
    )
    params = {n: p.detach().clone() for n, p in guide.named_parameters()}
    params["b"] = pyro.param("b").detach().clone()
    return params, result.losses


def _worker(rank, world, init_file, out):
    torch.set_default_dtype(torch.float64)
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        x, y = distributed.shard(*data())
        assert len(y) == (51 if rank == 0 else 50)
        params, losses = train(x, y, True)
        torch.save({"params": params, "losses": losses}, Path(out) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.skipif(not torch_dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_follow_the_single_process_full_data_trajectory():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(2, str(Path(tmp) / "init"), tmp), nprocs=2, join=True)
            ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]
        single_params, single_losses = train(*data(), False)
    finally:
        torch.set_default_dtype(old)
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name  # identical across ranks
        assert torch.allclose(value, single_params[name], rtol=1e-7, atol=1e-9), name
    assert ranks[0]["losses"] == pytest.approx(single_losses, rel=1e-9)
    # and training moved the parameters: equality is not that of two idle runs
    assert float(single_params["b"].abs()) > 1e-3


def test_without_a_process_group_distributed_fit_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        train(*data(), True)
    assert distributed.rank() == 0 and distributed.world_size() == 1


def test_tutorial_script_under_torchrun_prints_agreeing_checksums():
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYROFLOWS_TUTORIAL_FAST": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(root / "tutorials" / "distributed_svi.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # torchrun relays both ranks into one pipe, so lines can run together: match the
    # checksum by its exact format (.10f) rather than up to whitespace.
    sums = dict(re.findall(r"rank (\d) params-checksum (-?\d+\.\d{10})", done.stdout))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], done.stdout
