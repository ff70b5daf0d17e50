"""The command line, run as a user runs it: ``python -m pyroflows`` in a subprocess."""

import json
import subprocess
import sys
import textwrap

import arviz as az
import pytest

from pyroflows.cli import main

MODEL = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist

    def model(y, scale=1.0):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, scale), obs=y)

    def broken(y):
        raise ValueError("this model is broken")
    """
)


def run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pyroflows", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def files(tmp_path):
    (tmp_path / "m.py").write_text(MODEL)
    (tmp_path / "d.json").write_text(json.dumps({"y": [1.2, 0.4, 2.1, 1.7]}))
    (tmp_path / "bad.json").write_text(json.dumps({"z": [1.0]}))
    return tmp_path


def test_infer_writes_netcdf_and_prints_the_summary_and_route(files):
    out = run(
        "infer",
        "m.py:model",
        "--data",
        "d.json",
        "--out",
        "post.nc",
        "--seed",
        "1",
        "--num-samples",
        "500",
        cwd=files,
    )
    assert out.returncode == 0, out.stderr
    assert "mu" in out.stdout and "mean" in out.stdout and "r_hat" not in out.stdout
    assert "infer: PSIS-resampled" in out.stdout and "laplace" in out.stdout
    idata = az.from_netcdf(files / "post.nc")
    draws = idata.posterior["mu"].values.reshape(-1)
    assert draws.shape == (500,)
    # Exact posterior: precision 1/100 + 4, mean sum(y) / precision.
    precision = 0.01 + 4
    assert abs(draws.mean() - 5.4 / precision) < 4 / precision**0.5 / 500**0.5 * 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["infer", "nofile.py:model", "--data", "d.json"], "model file not found: nofile.py"),
        (["infer", "m.py:nomodel", "--data", "d.json"], "has no function 'nomodel'"),
        (["infer", "m.py:model", "--data", "missing.json"], "data file not found"),
        (["infer", "m.py:model", "--data", "bad.json"], "unknown 'z'; missing 'y'"),
        (["infer", "m.py:model"], "needs --data with 'y'"),
        (["infer", "m.py:broken", "--data", "d.json"], "ValueError: this model is broken"),
    ],
)
def test_bad_input_ends_with_one_line(files, args, message, monkeypatch, capsys):
    monkeypatch.chdir(files)
    status = main(args)
    err = capsys.readouterr().err
    assert status in (1, 2) and message in err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2


def test_bad_input_in_a_subprocess_has_no_traceback(files):
    out = run("infer", "m.py:broken", "--data", "d.json", cwd=files)
    assert out.returncode == 1
    assert "ValueError: this model is broken" in out.stderr and "Traceback" not in out.stderr


def test_debug_shows_the_traceback(files):
    out = run("--debug", "infer", "m.py:broken", "--data", "d.json", cwd=files)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "this model is broken" in out.stderr


@pytest.mark.slow  # the demo's own budget: under a minute on 2 cores
def test_demo_prints_the_table_and_writes_the_png(tmp_path):
    out = run("demo", "--out", "marginals.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reference" in out.stdout and "AutoNormal" in out.stdout and "infer" in out.stdout
    assert "PSIS k-hat" in out.stdout
    assert (tmp_path / "marginals.png").stat().st_size > 10_000
