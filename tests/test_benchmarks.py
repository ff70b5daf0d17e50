"""The benchmark ports stay runnable: each model broadcasts over draws and maps to the
reference's parameter names (skipped where the posteriordb folder is absent)."""

import pyro
import pytest
import torch

from benchmarks.heldout import HELDOUT
from benchmarks.posteriors import ADDED, ANALYTIC, OWN_REFERENCES, POSTERIORDB, POSTERIORS
from pyroflows import AutoFlowGuide
from pyroflows.draws import draw


@pytest.mark.parametrize("name", [*POSTERIORS, *ADDED, *HELDOUT])
def test_port_draws_vectorised_and_names_every_reference_parameter(name, recwarn):
    if not POSTERIORDB.exists() and name not in (*ANALYTIC, *OWN_REFERENCES, *HELDOUT):
        pytest.skip(f"no posteriordb at {POSTERIORDB}")
    pyro.clear_param_store()
    posterior = {**POSTERIORS, **ADDED, **HELDOUT}[name]()
    assert posterior.reference, f"{name} has no reference"
    guide = AutoFlowGuide(posterior.model)
    guide(*posterior.args)
    draws = draw(posterior.model, guide, posterior.args, {}, 50)
    assert not [w for w in recwarn if "sequentially" in str(w.message)], "port does not broadcast"
    params = posterior.to_params(draws.values)
    assert set(posterior.reference) <= set(params)
    assert all(v.shape == (50,) and torch.isfinite(v).all() for v in params.values())
    assert torch.isfinite(draws.log_weights).all()


def test_energy_references_integrate_to_their_grid_moments():
    u1 = POSTERIORS["U1"]()
    # U1 is symmetric in both coordinates: zero means, and a finite normaliser
    assert abs(u1.reference["z[1]"]["mean"]) < 1e-6 and abs(u1.reference["z[2]"]["mean"]) < 1e-6
    assert u1.log_z is not None and torch.isfinite(torch.tensor(u1.log_z))


def test_added_references_match_exact_draws():
    """The analytic references of the added posteriors, against draws made directly."""
    from benchmarks.posteriors import TWO_MODES, score

    g = torch.Generator().manual_seed(0)
    heavy = ADDED["heavy_tails_d3"]()
    x = torch.distributions.StudentT(1.5).sample((200_000, 3)).double()
    assert score(heavy, {"x": x})["max_dmean"] < 0.02
    two = ADDED["two_modes_d4"]()
    left = two.reference["left"]["mean"]
    var = [1 / (1 / s**2 + 1 / TWO_MODES["prior_sd"] ** 2) for s in TWO_MODES["sd"]]
    loc = [v * m / s**2 for v, m, s in zip(var, TWO_MODES["at"], TWO_MODES["sd"], strict=True)]
    right = torch.rand(200_000, generator=g, dtype=torch.float64) > left
    mean = torch.where(right, loc[1], loc[0])[:, None]
    sd = torch.where(right, var[1] ** 0.5, var[0] ** 0.5)[:, None]
    x = mean + sd * torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    scored = score(two, {"x": x})
    assert scored["max_dmean"] < 0.02 and scored["max_dlogsd"] < 0.02, scored


def test_a_library_option_runs_and_is_scored_on_the_resampled_draws():
    from benchmarks.accuracy import run_one

    threads = torch.get_num_threads()
    try:
        job = {"posterior": "U2", "guide": "AutoFlowGuide + importance_resample", "seed": 0}
        row = run_one({**job, "steps": 30})
    finally:
        torch.set_num_threads(threads)  # run_one pins its worker process to one thread
    assert "error" not in row, row.get("trace")
    assert 0 <= row["max_dmean"] < 10 and row["steps"] <= 30
    assert "k_hat_resampled" in row and "adaptations" in row


def test_targets_call_a_difference_within_the_seed_spread_a_tie():
    from benchmarks.report import aggregate, targets

    def rows(guide, values):
        return [
            {
                "posterior": "arK",
                "guide": guide,
                "seed": s,
                "max_dmean": 0.05,
                "max_dlogsd": 0.05,
                "max_w1": v,
            }
            for s, v in enumerate(values)
        ]

    agg = aggregate(
        rows("AutoFlowGuide", [0.10, 0.12, 0.14]) + rows("AutoMultivariateNormal", [0.11])
    )
    text = "\n".join(targets(agg, ["arK"]))
    assert "met on 1 of 1" in text and "a tie" in text
    agg = aggregate(
        rows("AutoFlowGuide", [0.10, 0.11]) + rows("AutoMultivariateNormal", [0.30, 0.31])
    )
    assert "better" in "\n".join(targets(agg, ["arK"]))


def test_plain_svi_protocol_runs_a_fixed_number_of_steps():
    from benchmarks.accuracy import run_one

    threads = torch.get_num_threads()
    try:
        row = run_one(
            {"posterior": "U2", "guide": "AutoNormal", "seed": 0, "steps": 25, "protocol": "svi"}
        )
    finally:
        torch.set_num_threads(threads)
    assert "error" not in row, row.get("trace")
    assert row["protocol"] == "svi" and row["steps"] == 25 and not row["converged"]


def test_without_posteriordb_the_runner_stops_before_writing_anything(tmp_path, monkeypatch):
    import benchmarks.__main__ as runner
    import benchmarks.posteriors as posteriors

    monkeypatch.setattr(posteriors, "POSTERIORDB", tmp_path / "nowhere")
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results")
    with pytest.raises(SystemExit, match="PYROFLOWS_POSTERIORDB"):
        runner.main(["--posteriors", "diamonds", "--guides", "AutoNormal"])
    assert not (tmp_path / "results").exists()


def test_the_exact_hierarchical_reference_has_the_limits_it_must():
    from benchmarks.locals import exact

    # Precise data: every theta_i is its y_i, up to sigma; mu's sd is tau / sqrt(n).
    y = torch.randn(50, generator=torch.Generator().manual_seed(0))
    ref = exact(torch.full((50,), 0.01), y, points=200)
    mean, sd = ref["theta"]
    assert torch.allclose(mean, y.double(), atol=1e-3)
    assert torch.allclose(sd, torch.full_like(sd, 0.01), rtol=0.05)
    assert abs(ref["mu"][0] - float(y.mean())) < 0.02
    assert abs(ref["mu"][1] / (ref["tau"][0] / 50**0.5) - 1) < 0.1


@pytest.mark.slow  # JAX dispatches op by op outside jit: ~2 s a model
@pytest.mark.parametrize("name", [n for n in [*POSTERIORS, *ADDED, *HELDOUT] if n != "garch11"])
def test_numpyro_copies_have_the_pyro_models_log_density(name):
    pytest.importorskip("numpyro")  # the bench extra
    if not POSTERIORDB.exists() and name not in (*ANALYTIC, *OWN_REFERENCES, *HELDOUT):
        pytest.skip(f"no posteriordb at {POSTERIORDB}")
    from benchmarks.numpyro_ports import same_log_density

    posterior = {**POSTERIORS, **ADDED, **HELDOUT}[name]()
    assert same_log_density(name, posterior) < 1e-5
