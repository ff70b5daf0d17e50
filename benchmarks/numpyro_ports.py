"""NumPyro copies of the benchmark posteriors, for NumPyro's NUTS beside ``infer``.

NumPyro's NUTS JIT-compiles the whole sampler, the fastest CPU sampler a Pyro user could
switch to. Each copy takes the Pyro port's own arguments (as arrays) and is checked to have
the same log joint as the Pyro model at random points (``same_log_density``; the test in
``tests/test_benchmarks.py`` runs it where numpyro is installed). garch11 (a sequential
recursion, a ``lax.scan`` in JAX) is not ported.

Needs the ``bench`` extra (``pip install -e ".[bench]"``): numpyro and jax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as nd
import torch
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

from .posteriors import HIERARCHICAL_LOGISTIC, TWO_MODES


def eight_schools_centered(y, sigma):
    mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
    with numpyro.plate("J", len(y)):
        theta = numpyro.sample("theta", nd.Normal(mu, tau))
        numpyro.sample("y", nd.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(y, sigma):
    mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
    with numpyro.plate("J", len(y)):
        eta = numpyro.sample("eta", nd.Normal(0.0, 1.0))
        numpyro.sample("y", nd.Normal(mu + tau * eta, sigma), obs=y)


def diamonds(xc, y):
    b = numpyro.sample("b", nd.Normal(jnp.zeros(xc.shape[1]), 1.0).to_event(1))
    intercept = numpyro.sample("Intercept", nd.StudentT(3.0, 8.0, 10.0))
    sigma = numpyro.sample("sigma", nd.FoldedDistribution(nd.StudentT(3.0, 0.0, 10.0)))
    with numpyro.plate("N", len(y)):
        numpyro.sample("Y", nd.Normal(intercept + xc @ b, sigma), obs=y)


def kilpisjarvi(x, y, prior):
    alpha = numpyro.sample("alpha", nd.Normal(prior["pmualpha"], prior["psalpha"]))
    beta = numpyro.sample("beta", nd.Normal(prior["pmubeta"], prior["psbeta"]))
    sigma = numpyro.sample("sigma", nd.ImproperUniform(constraints.positive, (), ()))
    with numpyro.plate("N", len(y)):
        numpyro.sample("y", nd.Normal(alpha + beta * x, sigma), obs=y)


def sblrc_blr(x, y):
    beta = numpyro.sample("beta", nd.Normal(jnp.zeros(x.shape[1]), 10.0).to_event(1))
    sigma = numpyro.sample("sigma", nd.HalfNormal(10.0))
    with numpyro.plate("N", len(y)):
        numpyro.sample("y", nd.Normal(x @ beta, sigma), obs=y)


def ar_k(lags, target):
    alpha = numpyro.sample("alpha", nd.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", nd.Normal(jnp.zeros(lags.shape[1]), 10.0).to_event(1))
    sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))
    with numpyro.plate("T", len(target)):
        numpyro.sample("y", nd.Normal(alpha + lags @ beta, sigma), obs=target)


def low_dim_gauss_mix(y):
    mu = numpyro.sample("mu", nd.ImproperUniform(constraints.ordered_vector, (), (2,)))
    numpyro.factor("mu_prior", nd.Normal(0.0, 2.0).log_prob(mu).sum(-1))
    sigma = numpyro.sample("sigma", nd.HalfNormal(2.0 * jnp.ones(2)).to_event(1))
    theta = numpyro.sample("theta", nd.Beta(5.0, 5.0))
    weights = jnp.stack([theta, 1.0 - theta], -1)
    with numpyro.plate("N", len(y)):
        mixture = nd.MixtureSameFamily(nd.Categorical(weights), nd.Normal(mu, sigma))
        numpyro.sample("y", mixture, obs=y)


def logistic_regression(x, y):
    w = numpyro.sample("w", nd.Normal(jnp.zeros(x.shape[1]), 2.5).to_event(1))
    b = numpyro.sample("b", nd.Normal(0.0, 2.5))
    with numpyro.plate("N", len(y)):
        numpyro.sample("y", nd.Bernoulli(logits=b + x @ w), obs=y)


def hierarchical_logistic_centered(x, group, y):
    mu = numpyro.sample("mu", nd.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", nd.HalfNormal(1.0))
    with numpyro.plate("groups", HIERARCHICAL_LOGISTIC["groups"]):
        a = numpyro.sample("a", nd.Normal(mu, sigma))
    beta = numpyro.sample("beta", nd.Normal(jnp.zeros(2), 1.0).to_event(1))
    with numpyro.plate("N", len(y)):
        numpyro.sample("y", nd.Bernoulli(logits=a[group] + x @ beta), obs=y)


def hierarchical_logistic_noncentered(x, group, y):
    """The same posterior, non-centred: the reference's sampler (make_references)."""
    mu = numpyro.sample("mu", nd.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", nd.HalfNormal(1.0))
    with numpyro.plate("groups", HIERARCHICAL_LOGISTIC["groups"]):
        z = numpyro.sample("z", nd.Normal(0.0, 1.0))
    a = numpyro.deterministic("a", mu + sigma * z)
    beta = numpyro.sample("beta", nd.Normal(jnp.zeros(2), 1.0).to_event(1))
    with numpyro.plate("N", len(y)):
        numpyro.sample("y", nd.Bernoulli(logits=a[group] + x @ beta), obs=y)


def funnel(dim):
    v = numpyro.sample("v", nd.Normal(0.0, 3.0))
    with numpyro.plate("i", dim - 1):
        numpyro.sample("x", nd.Normal(0.0, jnp.exp(v / 2)))


def energy(name):
    z = numpyro.sample("z", nd.Uniform(-4.0 * jnp.ones(2), 4.0).to_event(1))
    z1, z2 = z[..., 0], z[..., 1]
    w1 = jnp.sin(2 * math.pi * z1 / 4)
    w2 = 3 * jnp.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + jnp.exp(-(z1 - 1) / 0.3))
    if name == "U1":
        ring = 0.5 * ((jnp.linalg.norm(z, axis=-1) - 2) / 0.4) ** 2
        modes = logsumexp(
            jnp.stack([-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2]), 0
        )
        u = ring - modes
    elif name == "U2":
        u = 0.5 * ((z2 - w1) / 0.4) ** 2
    elif name == "U3":
        a, b = -0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2
        u = -logsumexp(jnp.stack([a, b]), 0)
    else:
        a, b = -0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2
        u = -logsumexp(jnp.stack([a, b]), 0)
    numpyro.factor("energy", -u)


def two_modes(dim):
    x = numpyro.sample("x", nd.Normal(jnp.zeros(dim), TWO_MODES["prior_sd"]).to_event(1))
    parts = [
        math.log(w) + nd.Normal(m, s).log_prob(x).sum(-1)
        for w, m, s in zip(*(TWO_MODES[k] for k in ("weights", "at", "sd")), strict=True)
    ]
    numpyro.factor("modes", logsumexp(jnp.stack(parts), 0))


def heavy_tails(dim, df=1.5):
    numpyro.sample("x", nd.StudentT(df, jnp.zeros(dim), 1.0).to_event(1))


def dugongs(x, y):
    alpha = numpyro.sample("alpha", nd.Normal(0.0, 1000.0))
    beta = numpyro.sample("beta", nd.Normal(0.0, 1000.0))
    lam = numpyro.sample("lambda", nd.Uniform(0.5, 1.0))
    tau = numpyro.sample("tau", nd.Gamma(1e-4, 1e-4))
    with numpyro.plate("N", len(y)):
        numpyro.sample("y", nd.Normal(alpha - beta * lam**x, 1 / jnp.sqrt(tau)), obs=y)


def surgical(n, r, centred=True):
    mu = numpyro.sample("mu", nd.Normal(0.0, 1000.0))
    sigmasq = numpyro.sample("sigmasq", nd.InverseGamma(1e-3, 1e-3))
    with numpyro.plate("hospitals", len(n)):
        b = hierarchy("b", mu, jnp.sqrt(sigmasq), centred)
        numpyro.sample("r", nd.Binomial(n, logits=b), obs=r)


def seeds(total, x1, x2, germinated, centred=True):
    alpha0 = numpyro.sample("alpha0", nd.Normal(0.0, 1000.0))
    alpha1 = numpyro.sample("alpha1", nd.Normal(0.0, 1000.0))
    alpha12 = numpyro.sample("alpha12", nd.Normal(0.0, 1000.0))
    alpha2 = numpyro.sample("alpha2", nd.Normal(0.0, 1000.0))
    tau = numpyro.sample("tau", nd.Gamma(1e-3, 1e-3))
    with numpyro.plate("plates", len(total)):
        b = hierarchy("b", 0.0, 1 / jnp.sqrt(tau), centred)
        logits = alpha0 + alpha1 * x1 + alpha2 * x2 + alpha12 * x1 * x2 + b
        numpyro.sample("n", nd.Binomial(total, logits=logits), obs=germinated)


def rats(rat, x, y, centred=True):
    flat = nd.ImproperUniform(constraints.positive, (), ())
    mu_alpha = numpyro.sample("mu_alpha", nd.Normal(0.0, 100.0))
    mu_beta = numpyro.sample("mu_beta", nd.Normal(0.0, 100.0))
    sigma_y = numpyro.sample("sigma_y", flat)
    sigma_alpha = numpyro.sample("sigma_alpha", flat)
    sigma_beta = numpyro.sample("sigma_beta", flat)
    with numpyro.plate("rats", 30):
        alpha = hierarchy("alpha", mu_alpha, sigma_alpha, centred)
        beta = hierarchy("beta", mu_beta, sigma_beta, centred)
    with numpyro.plate("points", len(y)):
        numpyro.sample("y", nd.Normal(alpha[rat] + beta[rat] * x, sigma_y), obs=y)


def glm_poisson(year, count):
    alpha = numpyro.sample("alpha", nd.Uniform(-20.0, 20.0))
    beta1 = numpyro.sample("beta1", nd.Uniform(-10.0, 10.0))
    beta2 = numpyro.sample("beta2", nd.Uniform(-10.0, 10.0))
    beta3 = numpyro.sample("beta3", nd.Uniform(-10.0, 10.0))
    with numpyro.plate("years", len(year)):
        log_rate = alpha + beta1 * year + beta2 * year**2 + beta3 * year**3
        numpyro.sample("C", nd.Poisson(jnp.exp(log_rate)), obs=count)


def arma11(y):
    mu = numpyro.sample("mu", nd.Normal(0.0, 10.0))
    phi = numpyro.sample("phi", nd.Normal(0.0, 2.0))
    theta = numpyro.sample("theta", nd.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))

    def step(previous_err, t):
        err = y[t] - (mu + phi * y[t - 1] + theta * previous_err)
        return err, err

    first = y[0] - (mu + phi * mu)
    _, rest = jax.lax.scan(step, first, jnp.arange(1, len(y)))
    err = jnp.concatenate([first[None], rest])
    numpyro.factor("y", nd.Normal(0.0, sigma).log_prob(err).sum())


def hierarchy(name, loc, scale, centred):
    """``Normal(loc, scale)`` as a latent, or its non-centred form (the references' sampler:
    the same posterior without the funnel), recorded under the same name."""
    if centred:
        return numpyro.sample(name, nd.Normal(loc, scale))
    z = numpyro.sample(f"{name}_z", nd.Normal(0.0, 1.0))
    return numpyro.deterministic(name, loc + scale * z)


HELDOUT = {
    "dugongs": dugongs,
    "surgical": surgical,
    "seeds": seeds,
    "rats": rats,
    "glm_poisson": glm_poisson,
    "arma11": arma11,
}
HIERARCHICAL = ("surgical", "seeds", "rats")


def _array(value):
    return jnp.asarray(value.numpy()) if isinstance(value, torch.Tensor) else value


def port(name: str, posterior):
    """``(numpyro model, its arguments)`` for the Pyro ``posterior`` named ``name``."""
    args = tuple(_array(a) for a in posterior.args)
    simple = {
        "eight_schools_centered": eight_schools_centered,
        "eight_schools_noncentered": eight_schools_noncentered,
        "diamonds": diamonds,
        "sblrc_blr": sblrc_blr,
        "arK": ar_k,
        "low_dim_gauss_mix": low_dim_gauss_mix,
        "logistic_regression": logistic_regression,
        "hierarchical_logistic_centered": hierarchical_logistic_centered,
    }
    if name in simple:
        return simple[name], args
    if name in HELDOUT:
        return HELDOUT[name], args
    if name == "kilpisjarvi":
        return kilpisjarvi, (*args, posterior.extra["prior"])
    if name.startswith("funnel_d"):
        return funnel, (int(name.removeprefix("funnel_d")),)
    if name in ("U1", "U2", "U3", "U4"):
        return energy, (name,)
    if name.startswith("two_modes_d"):
        return two_modes, (int(name.removeprefix("two_modes_d")),)
    if name.startswith("heavy_tails_d"):
        return heavy_tails, (int(name.removeprefix("heavy_tails_d")),)
    raise KeyError(f"no NumPyro copy of {name!r}")


def same_log_density(name: str, posterior, num_points: int = 5, seed: int = 0) -> float:
    """The largest relative difference between the Pyro model's and its copy's log joint at
    ``num_points`` draws of an (unfitted) AutoFlowGuide: a copy must be the same density."""
    import pyro
    from numpyro.infer.util import log_density
    from pyro import poutine

    from pyroflows import AutoFlowGuide

    pyro.set_rng_seed(seed)
    guide = AutoFlowGuide(posterior.model, init="prior", init_scale=0.5).setup(*posterior.args)
    draws = guide.sample_posterior(num_points, seed=seed)
    model, args = port(name, posterior)
    worst = 0.0
    for i in range(num_points):
        values = {k: v[i] for k, v in draws.items()}
        conditioned = poutine.condition(posterior.model, data=values)
        pyro_lp = float(poutine.trace(conditioned).get_trace(*posterior.args).log_prob_sum())
        params = {k: _array(v.detach()) for k, v in values.items()}
        numpyro_lp = float(log_density(model, args, {}, params)[0])
        worst = max(worst, abs(pyro_lp - numpyro_lp) / max(1.0, abs(pyro_lp)))
    return worst
